"""Checks shared by the audit's image functions."""

from __future__ import annotations

import torch

from ..errors import UEDatasetsError


def check_images(x: torch.Tensor, what: str = "x") -> None:
    """Raise `UEDatasetsError` unless ``x`` is a uint8 ``(N, C, H, W)`` CPU tensor with C in {1, 3}."""
    if not isinstance(x, torch.Tensor):
        raise UEDatasetsError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise UEDatasetsError(f"{what} must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UEDatasetsError(f"{what} must have shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise UEDatasetsError(f"{what} must be on the CPU, got {x.device}")
