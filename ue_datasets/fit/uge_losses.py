"""The three loss terms of Ungeneralizable Examples (a reconstruction: no public code).

Ye & Wang, CVPR 2024 describe them in words only ("match the gradients of the original data and its
ungeneralizable version", "maximizing a designated distance loss in a common feature space", an
"undistillation optimization"); the forms below are ours (methods reference, section 6, scaffold).
Images are float ``(B, C, H, W)`` in [0, 1]; ``x_u`` is the protected batch, differentiable w.r.t.
the perturbation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rng_state(device: torch.device) -> torch.Tensor:
    """The random state dropout draws from on ``device``."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    """Restore `rng_state`."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def parameter_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
    """``d CE(model(x), y) / d theta`` for every trainable parameter, in ``model.parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def gradient_matching_loss(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_gm: how far the authorized network's gradients on ``x_u`` are from those on the clean ``x``.

    For every parameter tensor, ``1 - cos`` between the two gradients of each output channel (rows of
    the tensor reshaped to ``(out, -1)``; a bias or norm vector is one row), averaged over all rows of
    all tensors. 0 when every channel's gradient points the same way; differentiable w.r.t. ``x_u``.

    Returns:
        A scalar float32 tensor in [0, 2].
    """
    rng = rng_state(x.device)  # the same dropout masks on both sides
    clean = [g.detach() for g in parameter_gradients(model, x, y, create_graph=False)]
    set_rng_state(x.device, rng)
    protected = parameter_gradients(model, x_u, y, create_graph=True)
    total, rows = x_u.new_zeros(()), 0
    for gc, gp in zip(clean, protected):
        shape = (gc.shape[0], -1) if gc.ndim > 1 else (1, -1)
        total = total + (1 - F.cosine_similarity(gp.reshape(shape), gc.reshape(shape), dim=1, eps=1e-12)).sum()
        rows += shape[0]
    return total / rows


def feature_distance_loss(encoder: nn.Module, x: torch.Tensor, x_u: torch.Tensor) -> torch.Tensor:
    """L_fd: minus the mean cosine distance ``1 - cos(E(x_u), E(x))`` in the fixed encoder's feature
    space; minimising it pushes protected features away from clean ones. A scalar in [-2, 0]."""
    with torch.no_grad():
        target = encoder(x)
    return -(1 - F.cosine_similarity(encoder(x_u), target, dim=1)).mean()


def misalignment_loss(encoder: nn.Module, x_u: torch.Tensor, y: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """L_fd, ``next-class`` form: the mean cosine distance ``1 - cos(E(x_u), c[(y + 1) mod K])`` between the
    protected features and the next class's clean feature center ``centers`` ``(K, D)``; minimising it
    pulls each class's protected images towards another class in the common space (our reading of the
    paper's "misalignment strategy"). A scalar in [0, 2]."""
    target = centers[(y + 1) % centers.shape[0]]
    return (1 - F.cosine_similarity(encoder(x_u), target, dim=1)).mean()


def undistillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """L_ud: minus ``tau**2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over the batch, between
    the authorized network (teacher) and a student distilled from it on protected data; minimising it
    makes the teacher's soft labels on protected images a poor guide for the student. A scalar <= 0."""
    log_t = F.log_softmax(teacher_logits / tau, dim=1)
    log_s = F.log_softmax(student_logits / tau, dim=1)
    return -(tau ** 2) * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """What the student minimises: ``tau**2 * KL(softmax(t / tau) || softmax(s / tau))`` (Hinton et al.), the
    teacher's logits detached."""
    return -undistillation_loss(teacher_logits.detach(), student_logits, tau)
