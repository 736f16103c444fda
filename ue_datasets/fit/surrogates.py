"""The surrogate classifiers that error-minimising fits (EM, SALM) train jointly with their noise.

A surrogate takes float ``(B, C, H, W)`` in ``[0, 1]`` and returns logits ``(B, num_classes)``; the
names are those of `ue_datasets.audit.models.build_model` (``small-cnn``, the CIFAR-style
``resnet18`` of the EM reference, any torchvision classifier), or a user's ``nn.Module``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..audit.models import MODELS, TORCHVISION_PREFIX, build_model, list_models
from ..errors import UEDatasetsError

#: What ``surrogate="auto"`` builds on each device type: the reference's ResNet-18 where there is a
#: GPU, the small CNN (about 100 x cheaper) on CPU.
AUTO = {"cuda": "resnet18", "cpu": "small-cnn"}


def surrogate_name(surrogate: str | nn.Module, device: torch.device) -> str:
    """The name recorded in a fit's parameters: the resolved model name, or a module's class name."""
    if isinstance(surrogate, nn.Module):
        return type(surrogate).__name__
    if surrogate == "auto":
        return AUTO.get(device.type, "small-cnn")
    return surrogate


def check_surrogate(surrogate: str | nn.Module) -> None:
    """Refuse, before any data is read, a surrogate that `build_surrogate` cannot build."""
    if isinstance(surrogate, nn.Module) or surrogate == "auto":
        return
    if not isinstance(surrogate, str):
        raise UEDatasetsError(f"surrogate must be a model name or an nn.Module, got {type(surrogate).__name__}")
    if surrogate.removeprefix(TORCHVISION_PREFIX) not in list_models():
        raise UEDatasetsError(f"unknown surrogate {surrogate!r}; choose auto, {', '.join(MODELS)} (built in), "
                              "a torchvision classifier name, or pass an nn.Module")


def build_surrogate(surrogate: str | nn.Module, num_classes: int, in_channels: int, image_size: int,
                    device: torch.device) -> nn.Module:
    """A randomly initialised surrogate on ``device``, in training mode.

    Args:
        surrogate: ``"auto"`` (CIFAR-style ``resnet18`` on CUDA, ``small-cnn`` elsewhere), any name
            `build_model` accepts, or an ``nn.Module`` (a deep copy is used, so the caller's module is
            neither moved nor trained).
        num_classes: number of logits.
        in_channels: 1 or 3, the channels of the fitted images.
        image_size: the smallest image side the surrogate will see (torchvision models are checked at it).
        device: where it runs.

    Returns:
        ``nn.Module`` taking float ``(B, in_channels, H, W)`` in ``[0, 1]``. Built from the global torch
        RNG: the caller seeds it.

    Raises:
        UEDatasetsError: an unknown name or a model that cannot take the images.
    """
    check_surrogate(surrogate)
    if isinstance(surrogate, nn.Module):
        model = copy.deepcopy(surrogate)
    else:
        model = build_model(surrogate_name(surrogate, device), num_classes, in_channels, image_size)
    return model.to(device).train()


def module_digest(model: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): tells a user's surrogate apart
    from another one when a cache is resumed."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sgd_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              clip_norm: float) -> None:
    """One optimizer step on ``CE(model(x), y)`` per ``(x, y)`` of ``batches`` (x float ``(B, C, H, W)`` in
    [0, 1], y int64 ``(B,)``), in training mode, the gradient norm clipped to ``clip_norm``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """Correct predictions and summed cross-entropy of ``model`` in eval mode (left so) on ``x`` float
    ``(B, C, H, W)`` in [0, 1] with labels ``y`` int64 ``(B,)``."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        return int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y, reduction="sum"))


class ChannelMatch(nn.Module):
    """A surrogate built for ``channels`` input channels that also takes one-channel images (repeated).

    ``forward``: float ``(B, 1 | channels, H, W)`` -> logits of ``model``.
    """

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return self.model(x)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A surrogate's parameters and buffers (``model.*``), its SGD momentum buffers (``optim.<i>``) and
    the torch RNG states (``rng``, and ``rng_cuda`` for a model on a GPU), as tensors to checkpoint
    with safetensors (`ue_datasets.fit.store.write_checkpoint`)."""
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in optimizer.state_dict()["state"].items():
        if s.get("momentum_buffer") is not None:
            out[f"optim.{i}"] = s["momentum_buffer"].clone()
    out["rng"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        out["rng_cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `training_state`."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = optimizer.state_dict()
    sd["state"] = {int(k[len("optim."):]): {"momentum_buffer": v} for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng"])
    if "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"], next(model.parameters()).device)
