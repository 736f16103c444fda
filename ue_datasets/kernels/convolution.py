"""CUDA's kernel: per-sample depthwise filtering, then division by the max.

For a uint8 image x of class y with filter s_y (k x k, the same on every colour channel):

    z = x * s_y          (depthwise correlation, zero padding k // 2, as ``torch.nn.Conv2d``)
    z = mean_c(z)        (only with ``grayscale``: every channel set to the channel mean)
    x~ = z / max(z)      (one scalar over C, H, W)
    out = trunc(x~ * 255)   or round-half-up with ``quantize="round"``

Arithmetic is float32 on the input's device. The correlation is a fixed sequence of k*k separately
rounded multiply and add passes over chunks of the batch (`convolve`), so every image's bytes depend
on that image alone: identical at any batch size, chunking and worker count. It works in 0..255 units,
where the official code divides by 255 first; the max division cancels the scale, but since the
official cuDNN summation order is unspecified anyway, a pixel may differ by one level from it at a
truncation boundary. An all-black image stays black (the max is guarded).

Two implementations give the same bytes. The torch passes here (`convolve` and `_filter_passes`) are
the reference, and what runs on CUDA. On CPU, `filter_images` runs the fused numba kernel of
`fused_filter` instead, which computes the same sequence of float32 operations per pixel, one image at
a time in cache, on ``torch.get_num_threads()`` threads: bit for bit the same output, several times
faster. The torch passes run on CPU too where numba is missing or fails to compile (logged once), for
inputs outside the kernel's scope (not uint8 or not float32 filters, even k, grayscale with C other
than 1 or 3, empty images), and with the environment variable ``UE_DATASETS_FUSED=0``.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

_log = logging.getLogger(__name__)

#: Bytes of float32 input per chunk on CPU: a few images, so the passes stay in cache.
_CPU_CHUNK_BYTES = 4 << 20


def _chunk_size(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, _CPU_CHUNK_BYTES // (4 * x[0].numel()))


def convolve(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise correlation with zero padding ``k // 2``.

    Tap by tap, each output pixel accumulates ``x[y + i - p, x + j - p] * w[i, j]`` in the order
    ``(i, j) = (0, 0), (0, 1), ...``; taps that fall on the zero padding are skipped (adding 0 changes
    no float sum), so no padded copy is made.

    Args:
        x: ``(B, C, H, W)`` float32.
        filters: ``(B, k, k)`` float32, one filter per sample, shared by its channels.

    Returns:
        ``(B, C, H, W)`` float32.
    """
    b, _, h, w = x.shape
    k = filters.shape[-1]
    p = k // 2
    out = torch.zeros_like(x)
    tmp = torch.empty_like(x)
    weights = filters.reshape(b, 1, k, k)
    for i in range(k):
        for j in range(k):
            dy, dx = i - p, j - p
            y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
            if y0 >= y1 or x0 >= x1:
                continue
            t = tmp[:, :, y0:y1, x0:x1]
            torch.mul(x[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx], weights[:, :, i : i + 1, j : j + 1], out=t)
            out[:, :, y0:y1, x0:x1] += t
    return out


#: Set to ``"0"`` to keep the torch passes on CPU too (read at every call).
FUSED_ENV = "UE_DATASETS_FUSED"

_fused_lock = threading.Lock()
_fused_module = None  # the `fused_filter` module once it compiled; False where it cannot run


def _fused():
    """The `fused_filter` module if its kernel runs in this process, else None (decided once)."""
    global _fused_module
    if _fused_module is None:
        with _fused_lock:
            if _fused_module is None:
                try:
                    from . import fused_filter

                    _fused_module = fused_filter if fused_filter.available() else False
                except Exception as e:  # noqa: BLE001 - numba missing (ImportError) or broken
                    _log.warning("ue_datasets: numba unavailable (%s: %s); the CPU filter uses the torch "
                                 "passes", type(e).__name__, e)
                    _fused_module = False
    return _fused_module or None


def _use_fused(x: torch.Tensor, filters: torch.Tensor, grayscale: bool) -> bool:
    """Whether the fused kernel takes this call: a CPU input it covers, unless ``UE_DATASETS_FUSED=0``."""
    if x.device.type != "cpu" or filters.device.type != "cpu" or os.environ.get(FUSED_ENV) == "0":
        return False
    if x.dtype != torch.uint8 or filters.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0:
        return False
    k = filters.shape[-1]
    if filters.shape != (x.shape[0], k, k) or k % 2 == 0 or (grayscale and x.shape[1] not in (1, 3)):
        return False
    return _fused() is not None


def filter_images(x: torch.Tensor, filters: torch.Tensor, grayscale: bool = False, quantize: str = "truncate") -> torch.Tensor:
    """Filter each image with its own filter and divide by the image's max (see the module docstring).

    On CPU this runs the fused kernel (`fused_filter`), on CUDA (or as the fallback) the torch passes:
    the same bytes either way.

    Args:
        x: uint8 ``(B, C, H, W)``, C = 1 or 3, any strides.
        filters: float32 ``(B, k, k)`` on ``x``'s device, one per image, k odd.
        grayscale: set every channel to the channel mean before the division.
        quantize: ``"truncate"`` (the reference) or ``"round"`` (half up).

    Returns:
        uint8 ``(B, C, H, W)`` on ``x``'s device, laid out as ``torch.empty_like(x)``; each image's
        bytes depend on it and its filter alone.
    """
    if _use_fused(x, filters, grayscale):
        out = _fused().filter_images(x, filters, grayscale, quantize == "round")
    else:  # on a contiguous batch, as always: the order of the channel mean's sum is pinned for that layout
        out = _filter_passes(x.contiguous(), filters, grayscale, quantize)
    if out.stride() == x.stride() or (x.is_contiguous() and out.is_contiguous()):  # (strides of size-1 dims vary)
        return out
    return torch.empty_like(x).copy_(out)  # other layouts stay so


def _filter_passes(x: torch.Tensor, filters: torch.Tensor, grayscale: bool, quantize: str) -> torch.Tensor:
    """`filter_images` as whole-chunk torch passes: the reference, and the CUDA and fallback path."""
    out = torch.empty_like(x)
    step = _chunk_size(x)
    for s in range(0, x.shape[0], step):
        z = convolve(x[s : s + step].to(torch.float32), filters[s : s + step])
        if grayscale:
            z = z.mean(dim=1, keepdim=True).expand_as(z).contiguous()
        peak = z.amax(dim=(1, 2, 3), keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        # z / peak <= 1 exactly in float32, so the product stays in [0, 255]; the cast truncates.
        z = z.div_(peak).mul_(255)
        if quantize == "round":
            z = z.add_(0.5)
        out[s : s + step] = z.to(torch.uint8)
    return out
