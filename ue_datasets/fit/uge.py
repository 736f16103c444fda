"""Fit Ungeneralizable Examples: noise that an authorized network still learns from, and others do not.

Ye & Wang, "Ungeneralizable Examples", CVPR 2024. **No code is public and the paper's losses are known
only in words**: this is a reconstruction (methods reference, section 6). The protector picks an
authorized network, an architecture and a secret initialisation seed, shared with authorized users
(`authorized_model` rebuilds it). Class-wise noise ``delta[y]`` (``(K, C, R, R)``, ``|delta| <= eps``) is
optimised round after round, along the authorized network's own training trajectory on the protected
data, to minimise

    lambda_gm * L_gm + lambda_fd * L_fd + lambda_ud * L_ud          (`ue_datasets.fit.uge_losses`)

- L_gm: the authorized network's parameter gradients on protected images match those on the clean
  images (so training it on protected data follows its clean trajectory and it still learns);
- L_fd: protected images are pushed away from the clean ones in a fixed encoder's feature space
  (``feature_target="clean"``), or pulled towards the next class's clean feature center
  (``"next-class"``, our reading of the paper's "misalignment"): a class-consistent shift, meant as
  the shortcut other networks take;
- L_ud: a student distilled from the authorized network on protected images disagrees with it
  (the authorized model is a poor teacher).

Each round: ``train_steps`` SGD steps of the authorized network on protected batches (its trajectory),
``train_steps`` distillation steps of the student, then ``pgd_steps`` signed-gradient steps on the
noise. Class-wise noise is the default and the only form here: one delta per class goes through the
``class`` lookup of the additive-noise path (tiny artifact, any adapter); a per-image generator or a
sample-wise bank would be the next form to try.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..apply.core import resolve_device
from ..artifact import Protection, as_protection
from ..errors import UEDatasetsError
from ..progress import progress_bar
from .budget import parse_eps
from .checkpoint import checkpoint_tensors, claim_cache, read_checkpoint, write_checkpoint
from .store import build_store, derive_seed
from .uge_losses import (
    distillation_loss,
    feature_distance_loss,
    gradient_matching_loss,
    misalignment_loss,
    rng_state,
    set_rng_state,
    undistillation_loss,
)

#: The forms of the feature-distance term (`fit_uge`'s ``feature_target``).
FEATURE_TARGETS = ("clean", "next-class")
#: Clean images per class whose features make a class's center (``next-class``).
CENTER_SAMPLES = 256
#: The student a distillation attacker trains (L_ud) and SGD's settings for both networks.
STUDENT = "small-cnn"
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4


def build_authorized(spec: dict[str, Any], seed: int) -> nn.Module:
    """The authorized network of ``spec`` (``arch``, ``num_classes``, ``in_channels``, ``image_size``)
    initialised from ``seed``, untouched global RNG; train mode, CPU."""
    from ..audit.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(spec["arch"], spec["num_classes"], spec["in_channels"], spec["image_size"])


def authorized_model(protection: Protection | str | os.PathLike) -> nn.Module:
    """The untrained authorized network of a UGE protection, with its secret initialisation.

    Returns:
        A fresh ``nn.Module`` in train mode on the CPU, the same in every process: it takes float images
        in [0, 1] ``(B, C, H, W)`` as the protected data has them and returns ``(B, num_classes)`` logits;
        train it with any ordinary loop on the published (protected) data.
    """
    protection = as_protection(protection)
    if protection.method != "uge":
        raise UEDatasetsError(f"not a UGE protection: {protection.method!r} has no authorized network")
    return build_authorized(protection.params["authorized"], int(protection.tensors["authorized_seed"].reshape(-1)[0]))


@torch.no_grad()
def _centers(encoder: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``(K, D)``: the mean L2-normalised clean feature of the first `CENTER_SAMPLES` images of each class."""
    rows = []
    for c in range(k):
        idx = torch.nonzero(y == c).flatten()[:CENTER_SAMPLES]
        if not len(idx):
            raise UEDatasetsError(f"class {c} has no images: next-class feature centers need every class")
        rows.append(F.normalize(encoder(x[idx].float() / 255), dim=1).mean(0))
    return torch.stack(rows)


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _round_state(delta: torch.Tensor, g: torch.Generator, nets: dict[str, tuple[nn.Module, torch.optim.Optimizer]]
                 ) -> dict[str, torch.Tensor]:
    """What a round's checkpoint holds: the noise, the batch generator's state, and each network's weights
    and momentum buffers (``NAME.model.*``, ``NAME.optim.I``)."""
    out = {"delta": delta.detach().cpu(), "batches": g.get_state()}
    for name, (net, opt) in nets.items():
        out.update({f"{name}.model.{k}": v.detach().cpu() for k, v in net.state_dict().items()})
        out.update({f"{name}.optim.{i}": s["momentum_buffer"].detach().cpu()
                    for i, s in opt.state_dict()["state"].items() if s.get("momentum_buffer") is not None})
    return out


def _restore_round(tensors: dict[str, torch.Tensor], g: torch.Generator,
                   nets: dict[str, tuple[nn.Module, torch.optim.Optimizer]], device: torch.device) -> torch.Tensor:
    """Inverse of `_round_state`; returns the noise on ``device``."""
    g.set_state(tensors["batches"])
    for name, (net, opt) in nets.items():
        net.load_state_dict({k[len(name) + 7:]: v for k, v in tensors.items() if k.startswith(f"{name}.model.")})
        sd = opt.state_dict()
        sd["state"] = {int(k.rsplit(".", 1)[1]): {"momentum_buffer": v.to(device)} for k, v in tensors.items()
                       if k.startswith(f"{name}.optim.")}
        opt.load_state_dict(sd)
    return tensors["delta"].to(device)


def fit_uge(
    src: str,
    *,
    authorized: str = "small-cnn",
    authorized_seed: int,
    encoder: str = "pixels",
    feature_target: str = "clean",
    label_field: str | None = None,
    image_field: str | None = None,
    key_field: str | None = None,
    num_classes: int | None = None,
    eps: float | str = 8 / 255,
    resolution: int | None = None,
    lambda_gm: float = 1.0,
    lambda_fd: float = 1.0,
    lambda_ud: float = 0.1,
    tau: float = 4.0,
    rounds: int = 10,
    train_steps: int = 10,
    pgd_steps: int = 5,
    step_size: float | str | None = None,
    batch_size: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    device: str = "auto",
    limit: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> Protection:
    """Fit class-wise Ungeneralizable Examples on labelled images (see the module docstring).

    Args:
        src: labelled images: shards, parquet files or a ``save_to_disk`` dataset.
        authorized: the authorized architecture (`ue_datasets.audit.models.build_model` names:
            ``small-cnn``, ``resnet18``, torchvision classifiers).
        authorized_seed: its secret initialisation seed (stored in the artifact's tensors).
        encoder: the fixed feature space of L_fd (any encoder spec: ``pixels``,
            ``packaged:efficientnet-lite0``, ``open_clip:...``, ``local-dir:...``).
        feature_target: L_fd's form (`FEATURE_TARGETS`): ``clean`` pushes protected features away from
            the image's clean ones; ``next-class`` pulls them towards the next class's clean feature center.
        label_field, image_field, key_field, num_classes, limit: as for ``fit em``.
        eps: L-inf budget (``8/255``).
        resolution: side of the deltas (default: the images' common square size; images are resized
            to it for the fit, deltas resized to each image nearest when applied).
        lambda_gm, lambda_fd, lambda_ud: the terms' weights; tau: the distillation temperature.
        rounds, train_steps, pgd_steps: rounds; per round, SGD steps of the authorized network and of
            the student, then signed-gradient steps on the noise.
        step_size: the noise step (default ``eps / 5``).
        batch_size, lr: batches (drawn with replacement) and the SGD learning rate of both networks.
        seed: the noise's start, the batches and the student's initialisation.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``...
        cache_dir: where the decoded samples and a checkpoint after every round are kept; a rerun with the
            same settings resumes from the last round. Default: a temporary folder (no resume).
        progress: progress bars.

    Returns:
        A ``uge`` `Protection` (``params["lookup"] == "class"``, ``tensors["deltas"]`` float32
        ``(K, C, R, R)``); ``params["history"]`` holds each round's mean ``gm``, ``fd`` and ``ud``.
    """
    from ..encoders import load_encoder

    eps = parse_eps(eps)
    step = eps / 5 if step_size is None else parse_eps(step_size)
    for name, value in (("rounds", rounds), ("train_steps", train_steps), ("pgd_steps", pgd_steps),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UEDatasetsError(f"{name} must be a positive integer, got {value!r}")
    if tau <= 0:
        raise UEDatasetsError(f"tau must be positive, got {tau}")
    if isinstance(authorized_seed, bool) or not isinstance(authorized_seed, int) or not 0 <= authorized_seed < 2**63:
        raise UEDatasetsError(f"authorized_seed must be an integer in [0, 2**63), got {authorized_seed!r}")
    if feature_target not in FEATURE_TARGETS:
        raise UEDatasetsError(f"feature_target must be one of {FEATURE_TARGETS}, got {feature_target!r}")
    dev = resolve_device(device)
    temporary = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="ue-uge-")) if temporary else Path(cache_dir)
    claim_cache(cache)
    try:
        store = build_store(src, cache / "store", image_field=image_field, label_field=label_field,
                            key_field=key_field, num_classes=num_classes, limit=limit, progress=progress)
        K, C = store.num_classes, store.channels
        common = store.common_size()
        if resolution is None and (common is None or common[0] != common[1]):
            raise UEDatasetsError(f"{src}: the images are not all square and of one size; give resolution")
        side = resolution or common[0]
        x_all = store.resized(torch.arange(len(store)), side, C).to(dev)
        y_all = store.labels.to(dev)
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)
    spec = {"arch": authorized, "num_classes": K, "in_channels": C, "image_size": side}
    model = build_authorized(spec, authorized_seed).to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "uge-student"))
        from ..audit.models import build_model

        student = build_model(STUDENT, K, C, side).to(dev)
    features = load_encoder(encoder, dev)
    centers = _centers(features, x_all, y_all, K) if feature_target == "next-class" else None
    g = torch.Generator().manual_seed(derive_seed(seed, "uge-batches"))
    delta = ((torch.rand(K, C, side, side, generator=g) * 2 - 1) * eps).to(dev)
    opt_a, opt_s = _sgd(model, lr), _sgd(student, lr)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g).to(dev)
        return x_all[idx].float() / 255, y_all[idx]

    def protect(x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (x + d[y]).clamp(0, 1)

    nets = {"authorized": (model, opt_a), "student": (student, opt_s)}
    settings = {"method": "uge", "source": src, "label_field": label_field, "image_field": image_field,
                "key_field": key_field, "limit": limit, "num_classes": K, "authorized": spec, "eps": eps,
                "encoder": features.spec.to_json(), "feature_target": feature_target,
                "weights": [lambda_gm, lambda_fd, lambda_ud], "tau": tau,
                "rounds": rounds, "train_steps": train_steps, "pgd_steps": pgd_steps, "step_size": step,
                "batch_size": batch_size, "lr": lr, "seed": seed, "device": dev.type}
    settings["authorized_seed"] = derive_seed("uge-authorized", authorized_seed)  # tells seeds apart, hides them
    history: dict[str, list[float]] = {"gm": [], "fd": [], "ud": []}
    directory, done, rng = None, 0, None
    if not temporary:
        directory = cache / "uge"
        directory.mkdir(exist_ok=True)
        found = read_checkpoint(directory, settings)
        if found is not None:
            done, history = found["round"], found["history"]
            saved = checkpoint_tensors(directory, found)
            delta, rng = _restore_round(saved, g, nets, dev), saved["rng"]
    bar = progress_bar(total=rounds, initial=done, desc="uge rounds", unit="round", disable=not progress)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # dropout, if the networks have any
        torch.manual_seed(derive_seed(seed, "uge-rng"))
        if rng is not None:
            set_rng_state(dev, rng)
        for r in range(done, rounds):
            model.train()
            for _ in range(train_steps):  # the authorized network's trajectory on the protected data
                x, y = draw()
                opt_a.zero_grad(set_to_none=True)
                F.cross_entropy(model(protect(x, y, delta)), y).backward()
                opt_a.step()
            student.train()
            for _ in range(train_steps):  # a student distilled from it on protected images
                x, y = draw()
                x_u = protect(x, y, delta)
                with torch.no_grad():
                    teacher = model.eval()(x_u)
                opt_s.zero_grad(set_to_none=True)
                distillation_loss(teacher, student(x_u), tau).backward()
                opt_s.step()
            model.train()
            sums = {"gm": 0.0, "fd": 0.0, "ud": 0.0}
            for _ in range(pgd_steps):
                x, y = draw()
                d = delta.clone().requires_grad_(True)
                x_u = protect(x, y, d)
                fd = (feature_distance_loss(features, x, x_u) if centers is None
                      else misalignment_loss(features, x_u, y, centers))
                terms = {"gm": gradient_matching_loss(model, x, x_u, y), "fd": fd,
                         "ud": undistillation_loss(model.eval()(x_u), student.eval()(x_u), tau)}
                model.train()
                loss = lambda_gm * terms["gm"] + lambda_fd * terms["fd"] + lambda_ud * terms["ud"]
                (grad,) = torch.autograd.grad(loss, d)
                delta = (delta - step * grad.sign()).clamp(-eps, eps)
                for k, v in terms.items():
                    sums[k] += v.item() / pgd_steps
            for k in history:
                history[k].append(round(sums[k], 6))
            if directory is not None:
                write_checkpoint(directory, {"settings": settings, "round": r + 1, "history": history},
                                 {**_round_state(delta, g, nets), "rng": rng_state(dev).cpu()})
            bar.update(1)
            bar.set_postfix(gm=f"{sums['gm']:.3f}", fd=f"{sums['fd']:.3f}", ud=f"{sums['ud']:.3f}", refresh=False)
    bar.close()
    params = {"lookup": "class", "eps": eps, "num_classes": K, "channels": C, "resolution": side,
              "authorized": spec, "student": STUDENT, "encoder": features.spec.to_json(),
              "feature_target": feature_target,
              "weights": {"gm": lambda_gm, "fd": lambda_fd, "ud": lambda_ud}, "tau": tau, "rounds": rounds,
              "train_steps": train_steps, "pgd_steps": pgd_steps, "step_size": step, "batch_size": batch_size,
              "lr": lr, "seed": seed, "samples": len(x_all), "history": history}
    tensors = {"deltas": delta.detach().float().cpu().contiguous(),
               "authorized_seed": torch.tensor([int(authorized_seed)], dtype=torch.int64)}
    return Protection("uge", json.loads(json.dumps(params)), tensors)
