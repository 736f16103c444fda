"""Image decoding and encoding shared by the adapters: PIL and encoded bytes to and from uint8 tensors.

Modes: L and RGB are protected as they are; LA and RGBA keep their alpha channel unchanged; ``1``
(bilevel) becomes L; P (palette) becomes RGB, or RGBA when it has transparency; CMYK and YCbCr become
RGB. EXIF orientation is applied before protecting (the output is written without EXIF), so the
protected image looks the way the original was displayed. An ICC profile that fits the output's
colour space (RGB or gray) is kept in the written image (PNG, WebP and JPEG all carry one).

Output formats (`OutputFormat`, ``--format``): ``png`` (the default: lossless, zlib level ``png_level``),
``webp`` (lossless WebP at the fastest effort, method 0 and quality 0, ``exact`` so that the colour of
fully transparent pixels is kept) and ``jpeg:Q`` (lossy, quality Q in 1..100, no chroma subsampling).
Each format takes only the modes it reads back as written: WebP has no grayscale mode (PIL stores L as
RGB, LA as RGBA, and they decode with 3 or 4 channels), so L and LA images are refused; JPEG holds no
alpha, so LA and RGBA images are refused. A refused image fails its sample, which names the file and the
key (or is skipped with ``on_error="skip"``).

Refused rather than silently reduced: more than 8 bits per sample (16-bit PNG, TIFF and PPM/PGM with a
maxval above 255; I;16, I and F modes); several frames (multi-page TIFF, APNG, animated WebP and GIF),
except an MPO JPEG, whose first frame is the picture; an image that declares more than ``max_pixels``
pixels, checked from its header before any decoding. 16 bpp BMPs (5-6-5 and 5-5-5) are 8-bit images
once decoded, and are accepted.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import UEDatasetsError

#: Modes kept as they are, by channel count.
MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
#: Modes converted on the way in.
CONVERTED = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}
#: Extensions of images that are read and protected.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp", "ppm", "pgm", "pbm", "gif")
#: Extensions of images that are not read: a field with one of them makes its sample fail, so that
#: no image is ever published unprotected.
UNREAD_IMAGE_EXTENSIONS = ("jfif", "jpe", "pnm", "pam", "apng", "avif", "heic", "heif", "jxl", "jp2", "j2k",
                           "jpx", "ico", "cur", "tga", "dds", "psd", "exr", "hdr", "svg", "eps", "pcx", "xbm",
                           "xpm", "dng", "cr2", "nef", "arw", "raw", "qoi", "sgi", "im", "icns", "blp", "fits")
#: Formats Pillow may open: those of `IMAGE_EXTENSIONS`. Restricting them keeps untrusted bytes away
#: from plugins that run external programs (EPS runs Ghostscript).
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "PPM", "GIF")
#: Compression level of written PNGs: lossless at any level; 1 is the fastest.
PNG_LEVEL = 1
#: What ``--format`` takes: names of the output formats (JPEG with its quality, ``jpeg:Q``).
OUTPUT_FORMATS = ("png", "webp", "jpeg:Q")
#: Settings of written WebPs: lossless, the fastest method and effort (on 224 x 224 photos 2.4x faster
#: than PNG level 1 and 26 % smaller; higher efforts are slower and save under 1 %, method 1 is 4x slower).
WEBP_OPTIONS = {"lossless": True, "method": 0, "quality": 0, "exact": True}
#: Largest side WebP (16383) and JPEG (65535) can hold.
_MAX_SIDE = {"webp": 16383, "jpeg": 65535}
#: Pixels (width x height) an image may declare: 100 megapixels, above any camera or dataset image
#: we know of (a 13000 x 13000 bomb is refused) and about 1.2 GB as float32 RGB in the core.
DEFAULT_MAX_PIXELS = 100_000_000
#: Raw modes with more than 8 bits per sample ("RGB;16B", "I;16", "L;16", "F;32F"...).
_DEEP_RAWMODE = re.compile(r";(16|32)[BLNSF]*\b|^(I|F)(;|$)")
#: Packed 16-bit pixels of 5-6-5 or 5-5-5 bits: 8-bit channels once decoded.
_PACKED_RAWMODES = {"BGR;15", "BGR;16", "RGB;15", "RGB;16", "BGRA;15", "RGBA;15"}
#: ICC colour-space signatures that fit each output mode.
_ICC_SPACE = {"L": b"GRAY", "LA": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}
#: Leading bytes of image formats, to catch an image in a field not named as one (long enough that
#: other data does not start with them by chance; shorter signatures are checked further below).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\x00\x00\x00\x0cJXL \r\n\x87\n",
          b"8BPS\x00\x01")
#: Sizes of the BMP info headers (core, v2..v5).
_BMP_HEADERS = {12, 40, 52, 56, 64, 108, 124}
#: Header tokens of a Netpbm file: a comment or a run of non-space bytes.
_NETPBM_TOKEN = re.compile(rb"#[^\n]*|[^\s#]+")


class ImageFormatError(UEDatasetsError):
    """An image cannot be decoded or has a mode that cannot be protected without loss."""


@dataclass(frozen=True)
class Decoded:
    """A decoded image: uint8 ``(C, H, W)`` pixels and the ICC profile to write with them (or ``None``)."""

    pixels: torch.Tensor
    icc_profile: bytes | None = None


def _netpbm(data: bytes, size: int, whole: bool) -> bool:
    """Whether ``data`` (the first bytes of ``size``) is a Netpbm image (P1-P6): a valid header and
    (when ``whole``) the pixels it declares."""
    kind = data[1:2]
    need = 2 if kind in (b"1", b"4") else 3
    numbers: list[int] = []
    end = 2
    for token in _NETPBM_TOKEN.finditer(data, 2, min(len(data), 512)):
        if token.group().startswith(b"#"):
            continue
        if not token.group().isdigit() or len(numbers) == need:
            break
        numbers.append(int(token.group()))
        end = token.end()
    if len(numbers) < need or not all(numbers) or (need == 3 and numbers[2] > 65535):
        return False
    w, h = numbers[0], numbers[1]
    if kind in (b"4", b"5", b"6"):  # binary pixels after one whitespace byte
        per_row = (w + 7) // 8 if kind == b"4" else w * (3 if kind == b"6" else 1) * (2 if numbers[-1] > 255 else 1)
        return not whole or size >= end + 1 + per_row * h
    values = data[end:end + 64].split()  # ASCII pixels: numbers only
    return (bool(values) or not whole) and all(v.isdigit() for v in values)


def looks_like_image(data: bytes, whole: bool = True) -> bool:
    """Whether ``data`` is an image file: PNG, JPEG, GIF, TIFF, WebP, BMP, PPM/PGM/PBM, JPEG 2000 and XL,
    AVIF/HEIF or PSD, by its leading bytes (and, for short signatures, their header's consistency);
    gzip-compressed data is looked into. ``whole=False``: ``data`` is only the start of a file."""
    head = bytes(data[:64])
    if head[:2] == b"\x1f\x8b":  # look at the first decompressed bytes only: no bomb can cost more
        import zlib

        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bytes(data[:1 << 12]), 64)
        except zlib.error:
            return False
        return head[:2] != b"\x1f\x8b" and looks_like_image(head, whole=False)
    if head.startswith(_MAGIC):
        return True
    if head[:3] == b"\xff\xd8\xff" and len(head) > 3 and head[3] >= 0xC0:  # SOI, then a marker
        return True
    if head[:4] in (b"II*\x00", b"MM\x00*") and len(head) >= 8:  # TIFF, with its first IFD inside the data
        offset = int.from_bytes(head[4:8], "little" if head[:2] == b"II" else "big")
        return 8 <= offset and (offset < len(data) or not whole)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return not whole or int.from_bytes(head[2:6], "little") in (0, len(data))  # declared file size
    if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2 and head[2:3].isspace():
        return _netpbm(bytes(data[:512]), len(data), whole)
    return head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")


def holds_image(value: object) -> bool:
    """Whether a field or cell value holds an image anywhere: image bytes, a PIL image, or either
    inside a dict or list (``{bytes, path}`` structs, sequences of images)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return looks_like_image(value)
    if isinstance(value, Image.Image):
        return True
    if isinstance(value, dict):
        return any(holds_image(v) for v in value.values())
    if isinstance(value, np.ndarray):
        return value.dtype == object and any(holds_image(v) for v in value.ravel())
    if isinstance(value, (list, tuple)):
        first = next((v for v in value if v is not None), None)
        if first is None or isinstance(first, (bool, int, float, str, np.number)):
            return False  # lists from Arrow are of one type: numbers or strings hold no image bytes
        return any(holds_image(v) for v in value)
    return False


def normalize_mode(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to L, LA, RGB or RGBA (see the module docstring)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image
        pass
    mode = img.mode
    if mode in MODES_BY_CHANNELS.values():
        return img
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in CONVERTED:
        return img.convert(CONVERTED[mode])
    raise ImageFormatError(
        f"image mode {mode!r} is not supported (8-bit L, LA, RGB, RGBA, P, 1, CMYK and YCbCr are); "
        "convert it to 8 bits explicitly if that loss is intended"
    )


def _deeper_than_8_bits(img: Image.Image) -> bool:
    if img.format == "TIFF":  # planar TIFFs unpack per band ("R", "G"...): read the depth from the tags
        bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        if bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8:
            return True
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], int) and img.format == "PPM":
            if args[1] > 255:  # PPM/PGM maxval
                return True
            args = args[0]
        rawmode = args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else args
        if isinstance(rawmode, str) and rawmode not in _PACKED_RAWMODES and _DEEP_RAWMODE.search(rawmode):
            return True
    return False


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes fully (so truncation shows here) after checking what they declare.

    Only `PIL_FORMATS` are opened; the declared size, the bit depth and the frame count are checked
    from the header, before the pixels are decoded (see the module docstring).
    """
    try:
        with warnings.catch_warnings():  # sizes are checked here, against max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageFormatError(f"image declares too many pixels ({e})") from None
    except Exception as e:
        raise ImageFormatError(f"cannot decode image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageFormatError(f"image declares {w} x {h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                               "(raise it with --max-pixels / max_pixels if such images are expected)")
    if _deeper_than_8_bits(img):
        raise ImageFormatError(f"image has more than 8 bits per sample (16-bit or float; {img.format} {img.mode}), "
                               "which is not supported; convert it to 8 bits explicitly if that loss is intended")
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":
        raise ImageFormatError(f"image has {frames} frames ({img.format}); only single-frame images are protected")
    try:
        img.load()
    except Exception as e:
        raise ImageFormatError(f"cannot decode image ({type(e).__name__}: {e})") from None
    return img


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (`open_image`), mode-normalised."""
    return normalize_mode(open_image(data, max_pixels))


def decode_with_profile(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode encoded image bytes to pixels and the ICC profile that still fits them."""
    img = open_image(data, max_pixels)
    icc = img.info.get("icc_profile") if img.mode not in ("CMYK", "YCbCr") else None
    img = normalize_mode(img)
    if not icc or bytes(icc[16:20]) != _ICC_SPACE.get(img.mode):
        icc = None  # converted colours (CMYK to RGB, say) are not what the profile describes
    return Decoded(pil_to_tensor(img), icc)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 ``(C, H, W)`` from a mode-normalised PIL image (C = 1, 2, 3 or 4)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def image_tensor(value: bytes | bytearray | memoryview | Image.Image) -> torch.Tensor:
    """uint8 ``(C, H, W)`` of encoded bytes (`decode`) or a PIL image (`normalize_mode`), as every stage reads images."""
    if isinstance(value, Image.Image):
        return pil_to_tensor(normalize_mode(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pil_to_tensor(decode(bytes(value)))
    raise UEDatasetsError(f"expected image bytes or a PIL image, got {type(value).__name__}")


def resize_square(t: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> uint8 ``(C, size, size)``: bilinear with antialias, rounded; as is when already that size."""
    if tuple(t.shape[-2:]) == (size, size):
        return t
    out = F.interpolate(t[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """A new PIL image (no filename, no format) from uint8 ``(C, H, W)``."""
    c = t.shape[0]
    if c not in MODES_BY_CHANNELS:
        raise UEDatasetsError(f"cannot make an image of {c} channels")
    arr = t.detach().to("cpu").permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr, MODES_BY_CHANNELS[c])


def encode_png(t: torch.Tensor | Image.Image, level: int = PNG_LEVEL, icc_profile: bytes | None = None) -> bytes:
    """Lossless PNG bytes of a uint8 ``(C, H, W)`` tensor or a PIL image, with ``icc_profile`` if given."""
    img = t if isinstance(t, Image.Image) else tensor_to_pil(t)
    buf = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    img.save(buf, format="PNG", compress_level=level, **extra)
    return buf.getvalue()


class LossyOutputWarning(UserWarning):
    """Protected images are written in a lossy format (``--format jpeg:Q``): part of the perturbation is lost."""


#: Set while an entry point that already warned about lossy output runs the writers it calls.
_LOSSY_WARNED: ContextVar[bool] = ContextVar("ue_datasets_lossy_warned", default=False)


@dataclass(frozen=True)
class OutputFormat:
    """How protected images are written: ``png`` (default), ``webp`` or ``jpeg:Q`` (see the module docstring).

    Attributes:
        name: ``"png"``, ``"webp"`` or ``"jpeg"``.
        quality: JPEG quality in 1..100 (``None`` for the lossless formats).
        png_level: zlib level of PNGs (lossless at any level; 1 is the fastest); not part of `spec`.
    """

    name: str = "png"
    quality: int | None = None
    png_level: int = PNG_LEVEL

    def __post_init__(self) -> None:
        if self.name not in ("png", "webp", "jpeg"):
            raise UEDatasetsError(f"unknown output format {self.name!r}; {_FORMATS_HELP}")
        if (self.quality is not None) != (self.name == "jpeg"):
            raise UEDatasetsError(f"output format {self.name!r}: a quality is given to JPEG only, and JPEG needs one; "
                                  f"{_FORMATS_HELP}")
        if self.quality is not None and (isinstance(self.quality, bool) or not isinstance(self.quality, int)
                                         or not 1 <= self.quality <= 100):
            raise UEDatasetsError(f"JPEG quality must be an integer in 1..100, got {self.quality!r}")
        if isinstance(self.png_level, bool) or not isinstance(self.png_level, int) or not 0 <= self.png_level <= 9:
            raise UEDatasetsError(f"png_level must be an integer in 0..9, got {self.png_level!r}")

    @classmethod
    def parse(cls, spec: str | OutputFormat | None, png_level: int = PNG_LEVEL) -> OutputFormat:
        """``"png"``, ``"webp"`` or ``"jpeg:Q"`` (case-insensitive; ``jpg:Q`` too) as an `OutputFormat`;
        ``None`` is PNG. An `OutputFormat` is returned as it is.

        Bare ``"jpeg"`` is refused: a lossy output is chosen with its quality written out.

        Raises:
            UEDatasetsError: an unknown format, a missing or bad JPEG quality, a parameter given to a
                lossless format; the message lists the valid specs.
        """
        if isinstance(spec, OutputFormat):
            return spec
        if spec is None:
            return cls("png", png_level=png_level)
        if not isinstance(spec, str):
            raise UEDatasetsError(f"an output format is a string such as 'png', 'webp' or 'jpeg:90', "
                                  f"got {type(spec).__name__}")
        name, sep, arg = spec.strip().lower().partition(":")
        name, arg = name.strip(), arg.strip()
        name = "jpeg" if name == "jpg" else name
        if name in ("png", "webp"):
            if sep:
                level = " (the PNG level is png_level / --png-level)" if name == "png" else ""
                raise UEDatasetsError(f"output format {spec!r}: {name} is lossless and takes no parameter{level}; "
                                      f"{_FORMATS_HELP}")
            return cls(name, png_level=png_level)
        if name == "jpeg":
            if not arg:
                raise UEDatasetsError(f"output format {spec!r}: JPEG needs its quality written out, as jpeg:Q with Q "
                                      f"in 1..100 (the higher Q, the more of the perturbation survives); "
                                      f"{_FORMATS_HELP}")
            if not arg.isdigit() or not 1 <= int(arg) <= 100:
                raise UEDatasetsError(f"output format {spec!r}: JPEG quality must be an integer in 1..100, "
                                      f"got {arg!r}; {_FORMATS_HELP}")
            return cls("jpeg", int(arg), png_level)
        raise UEDatasetsError(f"unknown output format {spec!r}; {_FORMATS_HELP}")

    @property
    def spec(self) -> str:
        """The canonical spec: ``"png"``, ``"webp"``, ``"jpeg:90"``; ``OutputFormat.parse(f.spec)`` gives ``f``
        (with the default PNG level)."""
        return f"jpeg:{self.quality}" if self.name == "jpeg" else self.name

    @property
    def lossless(self) -> bool:
        """Whether the written pixels are exactly the protected ones."""
        return self.name != "jpeg"

    @property
    def extension(self) -> str:
        """The file extension (and webdataset field part) of the written images: ``png``, ``webp``, ``jpg``."""
        return "jpg" if self.name == "jpeg" else self.name

    def refusal(self, channels: int, size: tuple[int, int] | None = None) -> str | None:
        """Why an image of ``channels`` channels (and ``(H, W)`` ``size``) cannot be written in this format
        so that it reads back as it was protected; ``None`` when it can."""
        if self.name == "webp" and channels in (1, 2):
            mode = MODES_BY_CHANNELS[channels]
            return (f"WebP has no grayscale mode: this {mode} image would be written as "
                    f"{'RGB' if channels == 1 else 'RGBA'} and read back with {channels + 2} channels; "
                    "write grayscale images with --format png (format='png') or jpeg:Q")
        if self.name == "jpeg" and channels in (2, 4):
            return (f"JPEG holds no alpha channel: this {MODES_BY_CHANNELS[channels]} image cannot be written "
                    "as JPEG without losing it; write images with transparency with --format png or webp")
        limit = _MAX_SIDE.get(self.name)
        if size is not None and limit is not None and max(size) > limit:
            return (f"{self.name.upper()} images are at most {limit} pixels on a side, this one is "
                    f"{size[1]} x {size[0]}; write it with --format png")
        return None

    def encode(self, t: torch.Tensor | Image.Image, icc_profile: bytes | None = None) -> bytes:
        """The bytes of a uint8 ``(C, H, W)`` tensor or a PIL image in this format, with ``icc_profile`` if given.

        Raises:
            ImageFormatError: an image this format cannot hold as it is (`refusal`).
        """
        if self.name == "png":
            return encode_png(t, self.png_level, icc_profile)
        img = t if isinstance(t, Image.Image) else tensor_to_pil(t)
        reason = self.refusal(len(img.getbands()), (img.height, img.width))
        if reason is not None:
            raise ImageFormatError(reason)
        extra = {"icc_profile": icc_profile} if icc_profile else {}
        buf = io.BytesIO()
        if self.name == "webp":
            img.save(buf, format="WEBP", **WEBP_OPTIONS, **extra)
        else:
            img.save(buf, format="JPEG", quality=self.quality, subsampling=0, **extra)
        return buf.getvalue()

    def lossy_warning(self) -> str:
        """What the lossy-output warning says (empty for lossless formats)."""
        if self.lossless:
            return ""
        return (f"--format {self.spec} (format={self.spec!r}) writes lossy JPEG: it erases part of the perturbation "
                "(more of it the lower the quality), so the published images are less protected than the ones "
                f"protect computed; `ue-datasets audit --defense none,publish:{self.spec} ...` shows how much "
                "protection survives. --format png or webp is lossless")


_FORMATS_HELP = "output formats: png (lossless, default), webp (lossless), jpeg:Q (lossy, quality Q in 1..100)"


def warn_if_lossy(output_format: OutputFormat, stacklevel: int = 2) -> None:
    """Warn (`LossyOutputWarning`) that ``output_format`` is lossy, unless a caller already did (`lossy_warned`)."""
    if not output_format.lossless and not _LOSSY_WARNED.get():
        warnings.warn(LossyOutputWarning(output_format.lossy_warning()), stacklevel=stacklevel + 1)


@contextmanager
def lossy_warned() -> Iterator[None]:
    """Within this block `warn_if_lossy` stays quiet: the entry point that opened it has warned once for its run."""
    token = _LOSSY_WARNED.set(True)
    try:
        yield
    finally:
        _LOSSY_WARNED.reset(token)
