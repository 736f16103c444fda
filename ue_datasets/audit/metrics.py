"""Imperceptibility of a protection: how far protected images are from their clean originals.

Every metric takes two uint8 ``(N, C, H, W)`` tensors (clean, protected; the same shape, C = 1 or 3,
on the CPU) and returns a float64 ``(N,)`` tensor, one value per image, computed in float64 on
``[0, 1]`` values (``uint8 / 255``) unless stated. Measure after the uint8 / PNG round trip, i.e. on the
pixels that are published (evaluation.md §2.1).

- `linf`: max absolute difference in 1/255 units (8.0 means 8/255).
- `l2`: Euclidean norm of the difference over all C*H*W values, in ``[0, 1]`` units.
- `psnr`: ``10 log10(1 / MSE)`` in dB, peak 1.0; ``inf`` for identical images.
- `ssim`: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1.0,
  'valid' region only (no padding), per channel then averaged over channels.

`imperceptibility` summarises them; `difference_grid` draws clean, protected and their difference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import UEDatasetsError
from .tensors import check_images

#: float64 values held at once per chunk of images (SSIM holds 5 filtered copies).
_CHUNK_VALUES = 1 << 22
#: SSIM constants (Wang et al. 2004) for data range 1.0.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _check_pair(clean: torch.Tensor, protected: torch.Tensor) -> None:
    check_images(clean, "clean")
    check_images(protected, "protected")
    if clean.shape != protected.shape:
        raise UEDatasetsError(f"clean and protected differ in shape: {tuple(clean.shape)} vs {tuple(protected.shape)}")


def _step(x: torch.Tensor, copies: int = 1) -> int:
    """Images per chunk so that ``copies`` float64 copies stay near `_CHUNK_VALUES` values."""
    per_image = copies * x.shape[1] * x.shape[2] * x.shape[3]
    return max(1, _CHUNK_VALUES // max(1, per_image))


def _diff01(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """``(protected - clean) / 255`` as float64 ``(n, C*H*W)``."""
    return (protected.to(torch.float64) - clean.to(torch.float64)).flatten(1) / 255.0


def linf(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image max absolute difference in 1/255 units: float64 ``(N,)`` in [0, 255] (8.0 = 8/255)."""
    _check_pair(clean, protected)
    if clean.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    d = (protected.to(torch.int16) - clean.to(torch.int16)).abs().flatten(1)
    return d.amax(dim=1).to(torch.float64)


def l2(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm of the difference over all C*H*W values in [0, 1] units: float64 ``(N,)``."""
    _check_pair(clean, protected)
    out = torch.empty(clean.shape[0], dtype=torch.float64)
    step = _step(clean)
    for s in range(0, clean.shape[0], step):
        out[s : s + step] = _diff01(clean[s : s + step], protected[s : s + step]).norm(dim=1)
    return out


def psnr(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with peak 1.0: ``10 log10(1 / MSE)``; float64 ``(N,)``, ``inf`` where identical."""
    _check_pair(clean, protected)
    out = torch.empty(clean.shape[0], dtype=torch.float64)
    step = _step(clean)
    for s in range(0, clean.shape[0], step):
        mse = _diff01(clean[s : s + step], protected[s : s + step]).square().mean(dim=1)
        out[s : s + step] = -10.0 * torch.log10(mse)  # log10(0) = -inf -> +inf
    return out


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_window(height: int, width: int) -> int:
    """SSIM window side for an image: ``min(11, height, width)``, made odd (by subtracting 1)."""
    win = min(SSIM_WINDOW, height, width)
    return win if win % 2 else win - 1


def _band(size: int, window: torch.Tensor) -> torch.Tensor:
    """``(size - win + 1, size)`` float64 matrix whose rows are ``window`` at every valid offset."""
    win = window.numel()
    out = torch.zeros(size - win + 1, size, dtype=torch.float64)
    for i in range(size - win + 1):
        out[i, i : i + win] = window
    return out


def ssim(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): float64 ``(N,)`` in [-1, 1], exactly 1.0 for identical images.

    Local means, variances and covariance use a normalised Gaussian window (sigma 1.5) of side
    `ssim_window` (11 for images of at least 11x11), applied separably over the 'valid' region only
    (as banded matrix products, ``G_h @ X @ G_w^T``);
    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = (0.01)^2``, ``C2 = (0.03)^2`` (data range 1). The map is averaged per channel, then over
    channels.
    """
    _check_pair(clean, protected)
    n, _, h, w = clean.shape
    out = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return out
    win = ssim_window(h, w)
    g = _gaussian_1d(win, SSIM_SIGMA)
    gh, gw_t = _band(h, g), _band(w, g).T
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    step = _step(clean, copies=10)
    for s in range(0, n, step):
        x = clean[s : s + step].to(torch.float64) / 255.0
        y = protected[s : s + step].to(torch.float64) / 255.0
        mx, my, exx, eyy, exy = gh @ torch.stack([x, y, x * x, y * y, x * y]) @ gw_t
        sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx * mx + my * my + c1) * (sxx + syy + c2)
        out[s : s + step] = (num / den).flatten(2).mean(dim=2).mean(dim=1)
    return out


def _finite_mean(v: torch.Tensor) -> float:
    finite = v[torch.isfinite(v)]
    return float(finite.mean()) if finite.numel() else float("inf")


def imperceptibility(clean: torch.Tensor, protected: torch.Tensor) -> dict:
    """Mean and worst case of every metric over a set of image pairs.

    Returns:
        ``{"linf": {"mean", "worst"}, "l2": {...}, "psnr": {...}, "ssim": {...}, "n": N,
        "identical": K}`` with plain Python floats and ints. ``worst`` is the max for linf and l2 and
        the min for psnr and ssim. ``identical`` counts pairs with no differing value. PSNR is ``inf``
        for those: its ``mean`` is over the other (differing) pairs only, and both ``mean`` and
        ``worst`` are ``float("inf")`` when every pair is identical. The other means are over all N
        pairs. ``inf`` is not valid JSON: report writers should encode it as the string ``"inf"``.

    Raises:
        UEDatasetsError: bad inputs, or N = 0.
    """
    _check_pair(clean, protected)
    n = clean.shape[0]
    if n == 0:
        raise UEDatasetsError("imperceptibility needs at least one image pair")
    li, l2_, ps, ss = linf(clean, protected), l2(clean, protected), psnr(clean, protected), ssim(clean, protected)
    return {
        "linf": {"mean": float(li.mean()), "worst": float(li.max())},
        "l2": {"mean": float(l2_.mean()), "worst": float(l2_.max())},
        "psnr": {"mean": _finite_mean(ps), "worst": float(ps.min())},
        "ssim": {"mean": float(ss.mean()), "worst": float(ss.min())},
        "n": int(n),
        "identical": int((li == 0).sum()),
    }


#: Smallest tile side in `difference_grid`, in pixels, reached by nearest-neighbour upscaling.
MIN_TILE = 96
_GAP = 4


def _rgb_tiles(x: torch.Tensor, factor: int) -> np.ndarray:
    """uint8 ``(k, C, H, W)`` -> ``(k, H * factor, W * factor, 3)`` numpy, nearest upscaling."""
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def difference_grid(
    clean: torch.Tensor, protected: torch.Tensor, n: int = 8, scale: float | None = None
) -> Image.Image:
    """A picture of the first ``n`` pairs: clean, protected and amplified absolute difference.

    One column per image and three rows: clean | protected | ``|protected - clean|`` multiplied by
    ``scale`` and clipped to 255 (per channel, so colour shows which channel changed). With
    ``scale=None`` it is ``255 / max difference`` over the shown images, so the largest difference is
    white (black everywhere when nothing differs); the row label gives the factor used. Images smaller
    than 96 pixels are upscaled by an integer factor with nearest neighbour; tiles are separated by
    white padding, and row labels are drawn on a white left margin.

    Args:
        clean, protected: uint8 ``(N, C, H, W)``, C = 1 or 3, N >= 1.
        n: most columns shown (>= 1).
        scale: difference amplification (> 0), or None for automatic.

    Returns:
        an RGB ``PIL.Image.Image``.
    """
    _check_pair(clean, protected)
    if clean.shape[0] == 0:
        raise UEDatasetsError("difference_grid needs at least one image pair")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UEDatasetsError(f"n must be a positive integer, got {n!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise UEDatasetsError(f"scale must be a positive number or None, got {scale!r}")
    a, b = clean[:n], protected[:n]
    k, _, h, w = a.shape
    diff = (b.to(torch.int16) - a.to(torch.int16)).abs().to(torch.float64)
    if scale is None:
        peak = float(diff.max())
        scale = 255.0 / peak if peak > 0 else 1.0
    amplified = (diff * scale).round().clamp(0, 255).to(torch.uint8)

    factor = max(1, math.ceil(MIN_TILE / min(h, w)))
    th, tw = h * factor, w * factor
    labels = ["clean", "protected", f"|diff| x{scale:.3g}"]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), t, font=font) for t in labels]
    margin = max(bx[2] - bx[0] for bx in boxes) + 2 * _GAP

    width = margin + k * tw + (k + 1) * _GAP
    height = 3 * th + 4 * _GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for row, imgs in enumerate((a, b, amplified)):
        tiles = _rgb_tiles(imgs, factor)
        y0 = _GAP + row * (th + _GAP)
        for col in range(k):
            x0 = margin + _GAP + col * (tw + _GAP)
            canvas[y0 : y0 + th, x0 : x0 + tw] = tiles[col]
    grid = Image.fromarray(canvas)
    draw = ImageDraw.Draw(grid)
    for row, (text, box) in enumerate(zip(labels, boxes)):
        y = _GAP + row * (th + _GAP) + (th - (box[3] - box[1])) // 2 - box[1]
        draw.text((_GAP, y), text, fill=(0, 0, 0), font=font)
    return grid
