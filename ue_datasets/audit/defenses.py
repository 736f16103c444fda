"""Defences an adversary applies to a protected training set, and a parser for defence specs.

Data-level defences (``jpeg``, ``grayscale``, ``bit_depth``, ``median_filter``, ``gaussian_blur``,
``upload``, ``publish``) take uint8 ``(N, C, H, W)`` tensors with C = 1 or 3 on the CPU and return uint8 tensors of
the same shape. They are deterministic; the random one (``upload``) takes a ``seed`` and draws from its
own ``numpy.random.RandomState``, never from a global generator. Parameters follow evaluation.md §1:

=============  ===========================================================  ==================
spec           what it does                                                 source
=============  ===========================================================  ==================
``none``       nothing (no data change, no augmentation)                    baseline
``jpeg[:Q]``   PIL JPEG encode/decode at quality Q (default 10)             ISS JPEG-10
``grayscale``  ITU-R 601-2 luma replicated to C channels                    ISS ``Grayscale(3)``
``bdr[:B]``    keep the top B bits of every value (default 2)               APBench BDR
``median[:K]`` K x K median filter, reflect padding (default 3)             median filter
``blur[:S]``   3 x 3 Gaussian blur with sigma S (default 0.1)               APBench GaussianBlur
``upload[:Q]`` random downscale/upscale, 90 % crop, JPEG at Q (default 75)  upload pipeline
``augment``    training-time random crop (zero pad) + horizontal flip       standard augment
``at[:E]``     PGD L-inf adversarial training, eps E/255 (default 8),       Madry / APBench
               10 steps of eps/4
``publish:F``  encode and decode as ``protect --format F`` writes (``png``,  this package
               ``webp``: identities; ``jpeg:Q``: JPEG at Q, 4:4:4)
=============  ===========================================================  ==================

``publish:jpeg:Q`` answers "how much protection survives if I publish as ``--format jpeg:Q``": audit a
lossless (PNG or WebP) output with it. Unlike ``jpeg:Q`` (the adversary's JPEG, PIL's 4:2:0 default), it
uses the writer's own encoder (`ue_datasets.apply.images.OutputFormat.encode`).

`parse_defense` turns a spec into a `Defense`; `random_crop_flip` is the batch augmentation the
trainer calls for ``augment``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..apply.images import OutputFormat, image_tensor
from ..errors import UEDatasetsError
from .tensors import check_images

#: Images per chunk in `median_filter` (its unfolded window is k*k times the input).
_MEDIAN_CHUNK_VALUES = 1 << 24


def _check_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise UEDatasetsError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Data-level defences
# ---------------------------------------------------------------------------------------------------


def _to_pil(img: torch.Tensor) -> Image.Image:
    """``(C, H, W)`` uint8 -> PIL L (C = 1) or RGB (C = 3)."""
    arr = img.numpy()
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)))


def _from_pil(img: Image.Image, channels: int) -> torch.Tensor:
    """PIL L or RGB -> ``(C, H, W)`` uint8."""
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return torch.from_numpy(arr.copy()).unsqueeze(0)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _jpeg_one(img: torch.Tensor, quality: int) -> torch.Tensor:
    buf = io.BytesIO()
    _to_pil(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        decoded.load()
        return _from_pil(decoded, img.shape[0])


def jpeg(x: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """JPEG-compress and decode every image with PIL (ISS JPEG-10 at the default quality).

    Each image is saved as L (C = 1) or RGB (C = 3) with PIL's defaults (standard quantisation tables,
    4:2:0 chroma subsampling for RGB) at ``quality`` and decoded again.

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        quality: PIL JPEG quality in [1, 100].

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    check_images(x)
    quality = _check_int(quality, "JPEG quality", 1, 100)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _jpeg_one(x[i], quality)
    return out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma replicated to every channel (ISS grayscale, torchvision ``Grayscale(3)``).

    ``L = R * 299/1000 + G * 587/1000 + B * 114/1000``, computed exactly as PIL's ``convert("L")``
    (16-bit fixed point, rounded): ``(19595 R + 38470 G + 7471 B + 32768) >> 16``. For C = 1 the images
    are already grey and are returned unchanged (a copy).

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.

    Returns:
        uint8 ``(N, C, H, W)`` with all channels equal.
    """
    check_images(x)
    if x.shape[1] == 1:
        return x.clone()
    v = x.to(torch.int32)
    luma = (v[:, 0] * 19595 + v[:, 1] * 38470 + v[:, 2] * 7471 + 32768) >> 16
    return luma.to(torch.uint8).unsqueeze(1).expand_as(x).contiguous()


def bit_depth(x: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Bit-depth reduction (posterize): keep the top ``bits`` bits of every value, zero the rest.

    Equals torchvision's ``RandomPosterize(bits, p=1)`` (APBench BDR uses ``bits=2``).

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        bits: bits kept, in [1, 8] (8 is the identity).

    Returns:
        uint8 ``(N, C, H, W)``; every value a multiple of ``2 ** (8 - bits)``.
    """
    check_images(x)
    bits = _check_int(bits, "bits", 1, 8)
    mask = (0xFF << (8 - bits)) & 0xFF
    return torch.bitwise_and(x, mask)


#: Devillard's median-of-9 exchange network (19 compare-exchanges); the median ends in slot 4.
_MEDIAN9 = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3),
    (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def _reflect_index(size: int, pad: int) -> torch.Tensor:
    """Indices of ``arange(-pad, size + pad)`` reflected into ``[0, size)`` without repeating the edge."""
    i = torch.arange(-pad, size + pad).abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def _forgetful_median(vals: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise median of an odd number of equal-shape tensors by forgetful selection (min/max only).

    Of ``2r + 1`` values, keep a pool of ``r + 2``; repeatedly drop the pool's min and max (neither can
    be the median) and add the next value; the one value left is the median.
    """
    if len(vals) == 1:
        return vals[0]
    r = len(vals) // 2
    pool, rest = list(vals[: r + 2]), list(vals[r + 2 :])
    while True:
        for i in range(len(pool) - 1):  # the max bubbles to the end
            pool[i], pool[i + 1] = torch.minimum(pool[i], pool[i + 1]), torch.maximum(pool[i], pool[i + 1])
        for i in range(len(pool) - 2, 0, -1):  # the min bubbles to the front
            pool[i - 1], pool[i] = torch.minimum(pool[i - 1], pool[i]), torch.maximum(pool[i - 1], pool[i])
        pool = pool[1:-1]
        if not rest:
            return pool[0]
        pool.append(rest.pop(0))


def median_filter(x: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Per-channel median over a ``kernel x kernel`` window.

    Borders use reflect padding without repeating the edge pixel (``torch.nn.functional.pad`` mode
    ``"reflect"``, numpy's ``"reflect"``, scipy's ``"mirror"``), so every side of the image must be
    longer than ``kernel // 2``. ``kernel`` is odd, so the median is one value of the window. The 3x3
    case runs a 19-exchange min/max network on uint8; larger kernels use forgetful selection (also
    min/max only).

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        kernel: odd window side >= 1 (1 is the identity).

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    kernel = _check_window(x, kernel, "median")
    n, c, h, w = x.shape
    p = kernel // 2
    if p == 0 or x.numel() == 0:
        return x.clone()
    rows, cols = _reflect_index(h, p), _reflect_index(w, p)
    out = torch.empty_like(x)
    step = max(1, _MEDIAN_CHUNK_VALUES // (c * h * w * kernel * kernel))
    for s in range(0, n, step):
        padded = x[s : s + step][:, :, rows][:, :, :, cols]
        vals = [padded[:, :, i : i + h, j : j + w].contiguous() for i in range(kernel) for j in range(kernel)]
        if kernel == 3:
            for a, b in _MEDIAN9:
                vals[a], vals[b] = torch.minimum(vals[a], vals[b]), torch.maximum(vals[a], vals[b])
            out[s : s + step] = vals[4]
        else:
            out[s : s + step] = _forgetful_median(vals)
    return out


def gaussian_blur(x: torch.Tensor, kernel: int = 3, sigma: float = 0.1) -> torch.Tensor:
    """Gaussian blur as ``torchvision.transforms.v2.functional.gaussian_blur`` (APBench ``GaussianBlur(3, 0.1)``).

    float32 convolution with a normalised ``kernel x kernel`` Gaussian, reflect padding, rounded back
    to uint8. At sigma 0.1 the off-centre weights are about 2e-22, so it is the identity in practice;
    sigma 1 visibly smooths.

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        kernel: odd kernel side >= 1.
        sigma: standard deviation in pixels, > 0.

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    kernel = _check_window(x, kernel, "blur")
    sigma = _check_positive(sigma, "blur sigma")
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def _check_window(x: torch.Tensor, kernel: object, what: str) -> int:
    """Check the images and an odd window side that fits them (reflect padding needs side > k // 2)."""
    check_images(x)
    kernel = _check_int(kernel, f"{what} kernel", 1, 99)
    if kernel % 2 == 0:
        raise UEDatasetsError(f"{what} kernel must be odd, got {kernel}")
    p = kernel // 2
    if p and x.numel() and min(x.shape[2], x.shape[3]) <= p:
        raise UEDatasetsError(f"a {kernel}x{kernel} {what} needs images larger than {p} pixels, got {tuple(x.shape[2:])}")
    return kernel


def _check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise UEDatasetsError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise UEDatasetsError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return TF.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def upload(x: torch.Tensor, seed: int = 0, quality: int = 75) -> torch.Tensor:
    """What an upload pipeline does to an image (evaluation.md §1, defence 14).

    Per image, in order: downscale by a factor ``f ~ U[0.5, 1.0]`` (bilinear, antialiased; each side
    ``max(1, round(side * f))``) and resize back up to the original size; crop a random window of
    ``max(1, round(0.9 * side))`` on each side and resize it back to full size (bilinear); JPEG at
    ``quality`` (as `jpeg`). The draws come from ``numpy.random.RandomState(seed)`` in image order
    (``f``, then the crop's top, then its left), so the output depends on the seed and on each image's
    position in ``x``.

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        seed: non-negative integer seed.
        quality: JPEG quality in [1, 100].

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    check_images(x)
    quality = _check_int(quality, "JPEG quality", 1, 100)
    seed = _check_int(seed, "seed", 0, 2**32 - 1)
    rng = np.random.RandomState(seed)
    _, _, h, w = x.shape
    ch, cw = max(1, round(0.9 * h)), max(1, round(0.9 * w))
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        f = rng.uniform(0.5, 1.0)
        top = rng.randint(0, h - ch + 1)
        left = rng.randint(0, w - cw + 1)
        img = x[i]
        small = (max(1, round(h * f)), max(1, round(w * f)))
        img = _resize(_resize(img, small), (h, w))
        img = _resize(img[:, top : top + ch, left : left + cw], (h, w))
        out[i] = _jpeg_one(img.contiguous(), quality)
    return out


def publish(x: torch.Tensor, output_format: str | OutputFormat = "png") -> torch.Tensor:
    """Every image as ``ue-datasets protect --format`` writes it and a reader decodes it.

    Lossless formats (``png``, ``webp``) give the images back unchanged (a copy: their codecs are exact,
    which the tests check); ``jpeg:Q`` encodes each image with `OutputFormat.encode` (quality Q, 4:4:4,
    L or RGB) and decodes it again.

    Args:
        x: uint8 ``(N, C, H, W)``, C = 1 or 3, on the CPU.
        output_format: an `OutputFormat` or its spec (``"jpeg:90"``).

    Returns:
        uint8 ``(N, C, H, W)``.
    """
    check_images(x)
    fmt = OutputFormat.parse(output_format)
    if fmt.lossless:
        return x.clone()
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = image_tensor(fmt.encode(x[i].contiguous()))
    return out


#: The data-level defences by spec name (each function's own keyword parameters differ).
DATA_DEFENSES: dict[str, Callable[..., torch.Tensor]] = {
    "jpeg": jpeg,
    "grayscale": grayscale,
    "bdr": bit_depth,
    "median": median_filter,
    "blur": gaussian_blur,
    "upload": upload,
}


# ---------------------------------------------------------------------------------------------------
# Training-time augmentation
# ---------------------------------------------------------------------------------------------------


def augment_pad(height: int, width: int) -> int:
    """Padding of the standard random crop: 4 for 32x32 (CIFAR), ``min(height, width) // 8`` in general."""
    return min(height, width) // 8


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Standard augmentation for one batch: random crop after zero padding, random horizontal flip.

    Each sample is zero-padded by ``pad`` on every side, cropped back to ``H x W`` at an offset drawn
    uniformly from ``[0, 2 * pad]`` on each axis, and flipped left-right with probability 1/2. Draws,
    from ``generator`` in this order: row offsets ``(B,)``, column offsets ``(B,)``, flips ``(B,)``; so
    the same generator state gives the same batch. The draws are made on the generator's device and
    moved to ``x``'s; the batch itself is indexed in one gather (no per-sample loop).

    Args:
        x: float ``(B, C, H, W)`` on any device.
        generator: a ``torch.Generator`` on the CPU or on ``x``'s device.
        pad: padding in pixels, >= 0 (0 gives flips only).

    Returns:
        float ``(B, C, H, W)``, same dtype and device as ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise UEDatasetsError(f"random_crop_flip needs a float (B, C, H, W) tensor, got {getattr(x, 'shape', x)!r}")
    pad = _check_int(pad, "pad", 0, 1 << 20)
    b, c, h, w = x.shape
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand((b,), generator=generator, device=gdev) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defense:
    """One audit defence, parsed from a spec such as ``"jpeg:10"``.

    Attributes:
        name: canonical spec, parameter always written out (``"jpeg:10"``, ``"blur:0.1"``, ``"blur:1.0"``,
            ``"at:8"``, ``"grayscale"``); ``parse_defense(d.name) == d`` (equality ignores ``apply``).
        description: one line for reports.
        apply: ``apply(x uint8 (N, C, H, W), seed) -> uint8 (N, C, H, W)`` applied once to the training
            set, or None for defences that change only training (``none``, ``augment``, ``at``).
        augment: train with `random_crop_flip` (pad `augment_pad`).
        adversarial_eps: PGD L-inf radius in [0, 1] units (``8/255``) for adversarial training, else None.
        pgd_steps: PGD steps per batch (0 without adversarial training).
        pgd_step: PGD step size in [0, 1] units (``eps / 4``), else None.
    """

    name: str
    description: str
    apply: Callable[[torch.Tensor, int], torch.Tensor] | None = field(default=None, compare=False)
    augment: bool = False
    adversarial_eps: float | None = None
    pgd_steps: int = 0
    pgd_step: float | None = None


def _seedless(x: torch.Tensor, seed: int, *, fn: Callable[..., torch.Tensor], **kwargs) -> torch.Tensor:
    """Adapter ``(x, seed) -> fn(x, **kwargs)`` for deterministic defences (picklable via partial)."""
    return fn(x, **kwargs)


def _parse_int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UEDatasetsError(
            f"defence {name!r}: parameter must be an integer in [{low}, {high}], got {text!r}"
        ) from None
    if not low <= value <= high:
        raise UEDatasetsError(f"defence {name!r}: parameter must be in [{low}, {high}], got {value}")
    return value


def _parse_float(name: str, text: str, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UEDatasetsError(f"defence {name!r}: parameter must be a number in (0, {high:g}], got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= high:
        raise UEDatasetsError(f"defence {name!r}: parameter must be in (0, {high:g}], got {text!r}")
    return value


def _none(_: str | None) -> Defense:
    return Defense("none", "no defence: the protected set as published, no augmentation")


def _grayscale(_: str | None) -> Defense:
    return Defense("grayscale", "ISS grayscale: ITU-R 601-2 luma on every channel", partial(_seedless, fn=grayscale))


def _augment(_: str | None) -> Defense:
    return Defense("augment", "standard augmentation: random crop (zero pad size/8) + horizontal flip", augment=True)


def _jpeg(arg: str | None) -> Defense:
    q = 10 if arg is None else _parse_int("jpeg", arg, 1, 100)
    source = "PIL; ISS JPEG-10" if q == 10 else "PIL"
    return Defense(f"jpeg:{q}", f"JPEG compression at quality {q} ({source})", partial(_seedless, fn=jpeg, quality=q))


def _bdr(arg: str | None) -> Defense:
    bits = 2 if arg is None else _parse_int("bdr", arg, 1, 8)
    apply = partial(_seedless, fn=bit_depth, bits=bits)
    return Defense(f"bdr:{bits}", f"bit-depth reduction to {bits} bits per channel", apply)


def _median(arg: str | None) -> Defense:
    k = 3 if arg is None else _parse_int("median", arg, 1, 99)
    if k % 2 == 0:
        raise UEDatasetsError(f"defence 'median': kernel must be odd, got {k}")
    return Defense(f"median:{k}", f"{k}x{k} median filter", partial(_seedless, fn=median_filter, kernel=k))


def _blur(arg: str | None) -> Defense:
    sigma = 0.1 if arg is None else _parse_float("blur", arg, 100.0)
    apply = partial(_seedless, fn=gaussian_blur, kernel=3, sigma=sigma)
    return Defense(f"blur:{sigma!r}", f"3x3 Gaussian blur, sigma {sigma:g}", apply)


def _upload(arg: str | None) -> Defense:
    q = 75 if arg is None else _parse_int("upload", arg, 1, 100)
    return Defense(
        f"upload:{q}",
        f"upload pipeline: random downscale x0.5-1 and back, 90% crop, JPEG quality {q}",
        partial(upload, quality=q),
    )


def _publish(arg: str | None) -> Defense:
    if arg is None:
        raise UEDatasetsError("defence 'publish' needs the output format, as publish:FORMAT "
                              "(publish:png, publish:webp, publish:jpeg:Q)")
    fmt = OutputFormat.parse(arg)
    what = ("lossless, the pixels unchanged" if fmt.lossless
            else f"JPEG quality {fmt.quality}, 4:4:4, encoded and decoded as protect writes it")
    return Defense(f"publish:{fmt.spec}", f"published as --format {fmt.spec} ({what})",
                   partial(_seedless, fn=publish, output_format=fmt.spec))


def _at(arg: str | None) -> Defense:
    eps = 8.0 if arg is None else _parse_float("at", arg, 255.0)
    text = str(int(eps)) if eps.is_integer() else repr(eps)
    return Defense(
        f"at:{text}",
        f"PGD adversarial training, L-inf eps {text}/255, 10 steps of {eps / 4:g}/255",
        adversarial_eps=eps / 255,
        pgd_steps=10,
        pgd_step=eps / 4 / 255,
    )


#: Spec name -> (takes a parameter, builder).
_SPECS: dict[str, tuple[bool, Callable[[str | None], Defense]]] = {
    "none": (False, _none),
    "jpeg": (True, _jpeg),
    "grayscale": (False, _grayscale),
    "bdr": (True, _bdr),
    "median": (True, _median),
    "blur": (True, _blur),
    "upload": (True, _upload),
    "augment": (False, _augment),
    "at": (True, _at),
    "publish": (True, _publish),
}

#: Every valid spec name, in the order of the module docstring.
DEFENSE_NAMES: tuple[str, ...] = tuple(_SPECS)

_VALID = (
    "valid defences: none, jpeg[:QUALITY], grayscale, bdr[:BITS], median[:KERNEL], blur[:SIGMA], "
    "upload[:QUALITY], augment, at[:EPS/255], publish:FORMAT (png, webp, jpeg:QUALITY)"
)


def parse_defense(spec: str) -> Defense:
    """Parse one defence spec: a name, optionally ``:PARAMETER`` (``"jpeg"``, ``"jpeg:50"``, ``"at:4"``).

    Names are case-insensitive and surrounding spaces are ignored. Defaults: jpeg 10, bdr 2, median 3,
    blur 0.1, upload 75, at 8; ``publish`` has none (``publish:jpeg:90``: its parameter is an output
    format, `ue_datasets.apply.images.OutputFormat`).

    Raises:
        UEDatasetsError: unknown name, a parameter given to a defence without one, or a bad parameter;
            the message lists the valid specs.
    """
    if not isinstance(spec, str):
        raise UEDatasetsError(f"a defence spec must be a string, got {type(spec).__name__}; {_VALID}")
    name, sep, arg = spec.strip().partition(":")
    name, arg = name.strip().lower(), arg.strip()
    if name not in _SPECS:
        raise UEDatasetsError(f"unknown defence {spec!r}; {_VALID}")
    takes_arg, build = _SPECS[name]
    if sep and not takes_arg:
        raise UEDatasetsError(f"defence {name!r} takes no parameter, got {spec!r}; {_VALID}")
    if sep and not arg:
        raise UEDatasetsError(f"defence {spec!r} has an empty parameter; {_VALID}")
    try:
        return build(arg if sep else None)
    except UEDatasetsError as e:
        raise UEDatasetsError(f"{e}; {_VALID}") from None


def parse_defenses(specs: str | Sequence[str]) -> list[Defense]:
    """Parse a comma-separated list (``"none,jpeg,grayscale"``) or a sequence of specs, in order.

    Raises:
        UEDatasetsError: an empty list, a bad spec, or the same defence twice (compared by canonical
            name, so ``"jpeg,jpeg:10"`` is a duplicate).
    """
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    items = [s.strip() if isinstance(s, str) else s for s in items]
    if not items or any(s == "" for s in items):
        raise UEDatasetsError(f"empty defence in {specs!r}; {_VALID}")
    out: list[Defense] = []
    seen: set[str] = set()
    for item in items:
        d = parse_defense(item)
        if d.name in seen:
            raise UEDatasetsError(f"defence {d.name!r} is listed twice in {specs!r}")
        seen.add(d.name)
        out.append(d)
    return out
