"""The inner step of error-minimising noise: PGD *descent* on the surrogate's loss (Huang et al. 2021)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with ``requires_grad`` off on every parameter; both restored on exit."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def min_min_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float,
                   step: float, steps: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``steps`` signed-gradient steps that *lower* ``CE(model(clamp(x + delta, 0, 1)), y)``.

    Each step, as the reference's ``PerturbationTool.min_min_attack``: ``x_adv = clamp(x + delta, 0, 1)``;
    ``delta -= step * sign(dCE/dx_adv)`` (times ``mask`` when given); ``delta = clamp(delta, -eps, eps)``;
    then ``delta = clamp(x + delta, 0, 1) - x``, so that ``x + delta`` stays in range (the reference
    keeps only the eps-clipped ``eta`` and clamps ``x + eta`` each step: the same images).

    The model runs `frozen`: in eval mode, no parameter gradients are made; its mode and ``requires_grad``
    flags are restored afterwards.

    Args:
        model: classifier taking float ``(B, C, H, W)`` in ``[0, 1]``.
        x: float ``(B, C, H, W)`` in ``[0, 1]``.
        y: int64 ``(B,)`` labels.
        delta: float ``(B, C, H, W)``, the start (not modified).
        eps: L-inf bound, in pixel-range units (8/255).
        step: step size (0.8/255 in the reference's settings).
        steps: number of steps (0 returns a copy of ``delta``).
        mask: optional float or bool ``(B, 1, H, W)`` (or broadcastable): where the noise may change (SALM);
            a zero ``delta`` stays zero outside it.

    Returns:
        Detached float ``(B, C, H, W)`` with ``|delta| <= eps`` and ``x + delta`` in ``[0, 1]`` (after at
        least one step).
    """
    x = x.detach()
    delta = delta.detach().clone()
    with frozen(model):
        for _ in range(steps):
            x_adv = torch.clamp(x + delta, 0, 1).requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                sign = grad.sign()
                if mask is not None:
                    sign = sign * mask
                delta = torch.clamp(delta - step * sign, -eps, eps)
                delta = torch.clamp(x + delta, 0, 1) - x
    return delta.detach()
