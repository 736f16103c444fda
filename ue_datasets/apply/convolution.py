"""Apply kernel of CUDA (method ``convolution``): class-wise depthwise filtering, then division by the max.

For a uint8 image x of class y with filter s_y (k x k, the same on every colour channel):

    z = x * s_y          (depthwise correlation, zero padding k // 2, as ``torch.nn.Conv2d``)
    z = mean_c(z)        (only with ``grayscale``: every channel set to the channel mean)
    x~ = z / max(z)      (one scalar over C, H, W)
    out = trunc(x~ * 255)   or round-half-up with ``quantize="round"``

Arithmetic is float32 on the input's device. The correlation is a fixed sequence of k*k separately
rounded multiply and add passes over chunks of the batch, so every image's bytes depend on that image
alone: identical at any batch size, chunking and worker count. It works in 0..255 units, where the
official code divides by 255 first; the max division cancels the scale, but since the official cuDNN
summation order is unspecified anyway, a pixel may differ by one level from it at a truncation
boundary. An all-black image stays black (the max is guarded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..artifact import Protection

#: Bytes of float32 work buffer per chunk on CPU: small enough to stay in cache.
_CPU_CHUNK_BYTES = 2 << 20


def _chunk_size(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return x.shape[0]
    per_image = 4 * x[0].numel() * 3
    return max(1, _CPU_CHUNK_BYTES // per_image)


def convolve(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise correlation with zero padding ``k // 2``.

    Args:
        x: ``(B, C, H, W)`` float32.
        filters: ``(B, k, k)`` float32, one filter per sample, shared by its channels.

    Returns:
        ``(B, C, H, W)`` float32.
    """
    b, c, h, w = x.shape
    k = filters.shape[-1]
    p = k // 2
    xp = F.pad(x, (p, p, p, p))
    out = torch.zeros_like(x)
    weights = filters.view(b, 1, k, k)
    for i in range(k):
        for j in range(k):
            out += xp[:, :, i : i + h, j : j + w] * weights[:, :, i : i + 1, j : j + 1]
    return out


def apply_convolution(protection: Protection, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Protect a batch of colour planes with the class filters.

    Args:
        protection: a fitted ``convolution`` protection.
        x: uint8 ``(B, C, H, W)`` with C = 1 or 3 (alpha already split off by the caller).
        labels: int64 ``(B,)`` class ids in ``[0, num_classes)``, on any device.

    Returns:
        uint8 ``(B, C, H, W)`` on ``x``'s device.
    """
    params = protection.params
    filters = protection.tensors["filters"].to(x.device)[labels.to(x.device)]
    out = torch.empty_like(x)
    step = _chunk_size(x)
    for s in range(0, x.shape[0], step):
        z = convolve(x[s : s + step].to(torch.float32), filters[s : s + step])
        if params["grayscale"]:
            z = z.mean(dim=1, keepdim=True).expand_as(z)
        peak = z.amax(dim=(1, 2, 3), keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
        z = (z / peak).mul_(255).clamp_(0, 255)
        z = z.add_(0.5).floor_() if params["quantize"] == "round" else z.floor_()
        out[s : s + step] = z.to(torch.uint8)
    return out
