"""Apply CUDA (method ``convolution``): each image is filtered with its class's filter.

The kernel, its arithmetic and its determinism: `ue_datasets.kernels.convolution`.
"""

from __future__ import annotations

import torch

from ..artifact import Protection
from ..kernels.convolution import filter_images


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
    return filter_images(x, filters, params["grayscale"], params["quantize"])
