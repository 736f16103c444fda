"""Image decoding and encoding shared by the adapters: PIL and encoded bytes to and from uint8 tensors.

Modes: L and RGB are protected as they are; LA and RGBA keep their alpha channel unchanged; ``1``
(bilevel) becomes L; P (palette) becomes RGB, or RGBA when it has transparency; CMYK and YCbCr become
RGB. 16-bit and float modes (I;16, I, F) are refused rather than silently reduced to 8 bits. EXIF
orientation is applied before protecting (the output is written without EXIF), so the protected image
looks the way the original was displayed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import UEDatasetsError

#: Modes kept as they are, by channel count.
MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
#: Modes converted on the way in.
CONVERTED = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}
#: Extensions that hold an image, in the order they are looked for in a webdataset sample.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp", "ppm", "pgm", "pbm")
#: Formats Pillow may open: those of `IMAGE_EXTENSIONS`. Restricting them keeps untrusted bytes away
#: from plugins that run external programs (EPS runs Ghostscript).
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "PPM")
#: Compression level of written PNGs: lossless at any level; 1 is the fastest.
PNG_LEVEL = 1


class ImageFormatError(UEDatasetsError):
    """An image cannot be decoded or has a mode that cannot be protected without loss."""


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


def decode(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (so truncation shows here), mode-normalised.

    Only `PIL_FORMATS` are opened, and images stored with 16 bits per sample are refused (Pillow would
    reduce 16-bit RGB to 8 bits silently).
    """
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Exception as e:
        raise ImageFormatError(f"cannot decode image ({type(e).__name__}: {e})") from None
    if any(";16" in str(tile[3]) for tile in getattr(img, "tile", []) or []):
        raise ImageFormatError(f"16-bit image ({img.format} {img.mode}) is not supported; convert it to 8 bits explicitly")
    try:
        img.load()
    except Exception as e:
        raise ImageFormatError(f"cannot decode image ({type(e).__name__}: {e})") from None
    return normalize_mode(img)


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


def encode_png(t: torch.Tensor | Image.Image, level: int = PNG_LEVEL) -> bytes:
    """Lossless PNG bytes of a uint8 ``(C, H, W)`` tensor or a PIL image."""
    img = t if isinstance(t, Image.Image) else tensor_to_pil(t)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()
