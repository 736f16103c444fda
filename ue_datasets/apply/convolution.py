"""Apply CUDA (method ``convolution``): each image is filtered with its class's filter; and the filter
kernel of lookup protections (`apply_filters`: Unlearnable Clusters' ``filters`` mode).

The kernel, its arithmetic and its determinism: `ue_datasets.kernels.convolution`.
"""

from __future__ import annotations

import torch

from ..artifact import Protection
from ..kernels.convolution import filter_images
from .noise import look_up


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


def apply_filters(protection: Protection, x: torch.Tensor, **conditions: object) -> torch.Tensor:
    """Kernel of lookup protections with ``params["kernel"] == "filter"``: each image is filtered with the
    row of ``filters`` its lookup finds (a cluster's, for Unlearnable Clusters), as CUDA filters a class.

    Args:
        x: uint8 ``(B, C, H, W)`` with C = 1 or 3.
        conditions: what the lookup needs or uses (``labels``, ``keys``).

    Returns:
        uint8 ``(B, C, H, W)`` on ``x``'s device.
    """
    params = protection.params
    return filter_images(x, look_up(protection, x, **conditions), params["grayscale"], params["quantize"])
