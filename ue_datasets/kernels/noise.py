"""The additive-noise kernel shared by every noise method (UC, EM, SALM, and T2UE and UGE next).

Every such method protects an image the same way, ``x~ = quantise(clamp(x / 255 + delta, 0, 1))``;
they differ only in how a sample's ``delta`` is found (`ue_datasets.apply.noise` holds those lookups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: How the protected value is brought back to 0..255: ``half-up`` ``floor(v + 0.5)`` (UC's
#: ``save_image``, and our EM), ``truncate`` ``floor(v)`` (the EM reference's uint8 cast).
ROUNDINGS = ("half-up", "truncate")


def match_delta(delta: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``delta`` brought to images of ``shape`` ``(B, C, H, W)``.

    Resized to H x W with nearest-neighbour interpolation (which keeps every value, so the L-inf
    bound); a one-channel delta is used on every colour channel, a three-channel delta on a grayscale
    image is averaged over its channels.
    """
    if delta.shape[-2:] != tuple(shape[-2:]):
        delta = F.interpolate(delta, size=tuple(shape[-2:]), mode="nearest")
    if delta.shape[1] != shape[1]:
        delta = delta.mean(1, keepdim=True) if shape[1] == 1 else delta.expand(-1, shape[1], -1, -1)
    return delta


def add_delta(x: torch.Tensor, delta: torch.Tensor, rounding: str = "half-up") -> torch.Tensor:
    """``quantise(255 * clamp(x / 255 + delta, 0, 1))``.

    Args:
        x: uint8 ``(B, C, H, W)``, C = 1 or 3.
        delta: float32 ``(B, Cd, R, R)`` in [-eps, eps] (image range units), Cd = 1 or 3, resized to
            H x W by `match_delta`; or integer ``(B, C, H, W)`` grey levels (a noise bank stores its
            deltas quantised so), added exactly: ``clamp(x + delta, 0, 255)``.
        rounding: one of `ROUNDINGS` (float deltas only; integer levels need none).

    Returns:
        uint8 ``(B, C, H, W)``. With ``half-up``, ``|x~ - x| <= floor(255 * eps + 0.5)`` grey levels.

    Example:
        >>> x = torch.tensor([0, 100, 250], dtype=torch.uint8).reshape(1, 1, 1, 3)
        >>> add_delta(x, torch.full((1, 1, 1, 1), 8 / 255)).flatten().tolist()
        [8, 108, 255]
        >>> add_delta(x, torch.tensor([-3, 3, 9], dtype=torch.int8).reshape(1, 1, 1, 3)).flatten().tolist()
        [0, 103, 255]
    """
    if not delta.is_floating_point():
        return x.to(torch.int16).add_(match_delta(delta, x.shape).to(torch.int16)).clamp_(0, 255).to(torch.uint8)
    y = x.to(torch.float32).div_(255).add_(match_delta(delta, x.shape)).clamp_(0, 1).mul_(255)
    if rounding == "half-up":
        y = y.add_(0.5)
    elif rounding != "truncate":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return y.floor_().to(torch.uint8)
