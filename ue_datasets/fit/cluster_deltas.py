"""Optimise Unlearnable Clusters' perturbations with the surrogate: the ``faithful`` and ``fast`` modes.

Both push the surrogate features of ``x + delta_k`` towards the *next* cluster's center ``(k + 1) mod K``:
``loss = KL(softmax(center_t) || softmax(f(x + delta_k)))`` (softmax over feature dimensions). ``faithful``
trains one ResNet generator per cluster as the reference code does; ``fast`` (ours) takes signed gradient
steps on the K deltas directly, all in the same pass, from a random start or a given one (``blocks`` mode
refines its patterns this way). Both resume from a checkpoint of the very same training.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .cost import StepTimer
from .features import FeatureSet
from .generator import ResnetGenerator


def kl_to_center(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(center) || softmax(z))`` per row, softmax over features.

    Args:
        z: ``(B, D)`` surrogate features; center: ``(B, D)`` or ``(D,)`` target centers.

    Returns:
        ``(B,)`` float.
    """
    p = F.softmax(center, dim=-1).expand_as(z)
    return F.kl_div(F.log_softmax(z, dim=-1), p, reduction="none").sum(-1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's Resize(256) -> RandomCrop(224) -> HFlip, scaled to ``x``'s size R.

    ``x``: float ``(B, C, R, R)``; upscaled to ``round(R * 256 / 224)``, one random crop per image.
    """
    r = x.shape[-1]
    big = round(r * 256 / 224)
    up = F.interpolate(x, size=(big, big), mode="bilinear", antialias=False, align_corners=False)
    offsets = torch.randint(0, big - r + 1, (x.shape[0], 2), generator=generator).tolist()
    flips = torch.rand(x.shape[0], generator=generator).lt(0.5).tolist()
    out = [up[i, :, a : a + r, b : b + r] for i, (a, b) in enumerate(offsets)]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips)])


def _train_images(data: FeatureSet, assignments: torch.Tensor, k: int | None) -> torch.Tensor:
    return data.images if k is None else data.images[assignments == k]


def train_generators(encoder, data: FeatureSet, centers: torch.Tensor, assignments: torch.Tensor, *, eps: float,
                     epochs: int, lr: float, batch_size: int, cluster_data: str, seed: int, device: torch.device,
                     checkpoint: Path, settings: dict[str, Any], progress: bool, timer: StepTimer) -> torch.Tensor:
    """One generator per cluster (see the module docstring). Resumes cluster by cluster.

    Returns float32 ``(K, C, R, R)`` in [-eps, eps] on CPU.
    """
    K, C, R = centers.shape[0], data.images.shape[1], data.images.shape[-1]
    deltas = _load_checkpoint(checkpoint, settings)
    done = int(deltas.pop("done")) if "done" in deltas else 0
    out = deltas.get("deltas", torch.zeros(K, C, R, R))
    sizes = [len(data)] * K if cluster_data == "all" else torch.bincount(assignments, minlength=K).tolist()
    timer.begin(sum(epochs * math.ceil(sizes[k] / batch_size) for k in range(done, K)))
    for k in range(done, K):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)  # the generator's initial weights
            net = ResnetGenerator(3, C).to(device).train()
        sigma = torch.rand(1, 3, R, R, generator=g).to(device)
        target = centers[(k + 1) % K].to(device)
        images = _train_images(data, assignments, k if cluster_data == "members" else None)
        if not len(images):
            warnings.warn(f"cluster {k} has no members: its generator is not trained", stacklevel=2)
        steps = epochs * math.ceil(len(images) / batch_size)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=1e-6)
        bar = progress_bar(total=steps, desc=f"generator {k + 1}/{K}", disable=not progress)
        for _ in range(epochs):
            for i in range(0, len(images), batch_size):
                x = _augment(images[i : i + batch_size].to(device).float().div(255), g)
                delta = net(sigma).clamp(-eps, eps)
                loss = kl_to_center(encoder(torch.clamp(x + delta, 0, 1)), target).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                timer.tick()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3g}")
        bar.close()
        with torch.no_grad():  # train-mode batch norm, as the reference
            out[k] = net(sigma).clamp(-eps, eps)[0].cpu()
        _save_checkpoint(checkpoint, {"deltas": out, "done": torch.tensor(k + 1)}, settings)
    return out


def train_deltas(encoder, data: FeatureSet, centers: torch.Tensor, assignments: torch.Tensor, *, eps: float,
                 epochs: int, lr: float, batch_size: int, cluster_data: str, seed: int, device: torch.device,
                 checkpoint: Path, settings: dict[str, Any], progress: bool, timer: StepTimer,
                 init: torch.Tensor | None = None) -> torch.Tensor:
    """All K deltas at once by signed gradient steps (see the module docstring). Resumes by epoch.

    ``init``: float32 ``(K, C, R, R)`` in [-eps, eps] to start from; default uniform in [-eps, eps] from ``seed``.
    Returns float32 ``(K, C, R, R)`` in [-eps, eps] on CPU.
    """
    K, C, R = centers.shape[0], data.images.shape[1], data.images.shape[-1]
    g = torch.Generator().manual_seed(seed)
    state = _load_checkpoint(checkpoint, settings)
    start = int(state["done"]) if "done" in state else 0
    if "deltas" in state:
        delta = state["deltas"]
    elif init is not None:
        delta = init.clone().float()
    else:
        delta = (torch.rand(K, C, R, R, generator=g) * 2 - 1) * eps
    delta = delta.to(device).requires_grad_(True)
    centers = centers.to(device)
    n = len(data)
    steps = epochs * math.ceil(n / batch_size)
    bar = progress_bar(total=steps, initial=start * math.ceil(n / batch_size), desc="perturbations",
                       disable=not progress)
    timer.begin(steps - start * math.ceil(n / batch_size))
    for epoch in range(start, epochs):
        ge = torch.Generator().manual_seed(seed * 1000 + epoch + 1)
        order = torch.randperm(n, generator=ge)
        step = lr * eps * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = _augment(data.images[idx].to(device).float().div(255), ge)
            r = assignments[idx] if cluster_data == "members" else torch.randint(0, K, (len(idx),), generator=ge)
            r = r.to(device)
            loss = kl_to_center(encoder(torch.clamp(x + delta[r], 0, 1)), centers[(r + 1) % K]).mean()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= step * grad.sign()
                delta.clamp_(-eps, eps)
            timer.tick()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3g}")
        _save_checkpoint(checkpoint, {"deltas": delta.detach().cpu(), "done": torch.tensor(epoch + 1)}, settings)
    bar.close()
    return delta.detach().cpu()


def _load_checkpoint(path: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint of this very training (same settings and centers), else nothing."""
    from safetensors import safe_open

    if not path.exists():
        return {}
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("settings") != json.dumps(settings, sort_keys=True):
            return {}
        return {k: f.get_tensor(k) for k in f.keys()}


def _save_checkpoint(path: Path, state: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"settings": json.dumps(settings, sort_keys=True)})
    os.replace(tmp, path)
