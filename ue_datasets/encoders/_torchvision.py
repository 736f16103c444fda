"""The ``torchvision`` kind: a torchvision classification network with its last linear head removed.

Spec strings: ``torchvision:NAME:/path/weights.{pth,pt,safetensors}``, ``torchvision:NAME:WEIGHTS_ENUM``
(only when torchvision's cache already holds the file) and plain ``torchvision:NAME``, a seeded random
network for tests only (`RandomEncoderWarning`). Features: the penultimate ``(B, in_features)``
float32 of the head; the digest is over the headless network's state_dict.
"""

from __future__ import annotations

import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import Loaded, accepted_specs, register_kind
from .spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    EncoderSpec,
    Overrides,
    RandomEncoderWarning,
    _abs_file,
    _finish,
    _interp_name,
    _is_path,
)

#: Seed of the random initialisation of ``torchvision:NAME`` (no weights), so that it is reproducible.
RANDOM_INIT_SEED = 0


def _torchvision_cached_weights(name: str, enum_name: str) -> tuple[str, dict]:
    """Resolve a torchvision weights enum name to its file in torch's hub cache (no download)."""
    import torchvision

    try:
        w = torchvision.models.get_model_weights(name)[enum_name]
    except (KeyError, ValueError) as e:
        raise EncoderError(
            f"{enum_name!r} is neither a local weights file nor a torchvision weights name of {name!r}"
        ) from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(w.url).path)
    if not path.is_file():
        raise EncoderError(
            f"torchvision weights {name}:{enum_name} are not in the local cache ({str(path)!r}) and are "
            f"not downloaded here. Give a local file: 'torchvision:{name}:/path/weights.pth' (made on a "
            f"machine with internet by `torch.save(torchvision.models.{name}(weights='{enum_name}')"
            f".state_dict(), 'weights.pth')`)."
        )
    t = w.transforms()
    pp = {
        "size": int(t.crop_size[0]),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": _interp_name(t.interpolation),
    }
    return str(path.resolve()), pp


def _parse_torchvision(rest: str, over: Overrides) -> EncoderSpec:
    """``torchvision:NAME[:WEIGHTS]``: 224 px, ImageNet mean/std, bilinear, shortest (or the enum's)."""
    import torchvision

    if not rest:
        raise EncoderError(f"missing torchvision model name in 'torchvision:'; {accepted_specs()}")
    name, _, weights = rest.partition(":")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise EncoderError(
            f"unknown torchvision classification model {name!r}; known models include "
            f"resnet18, resnet50, vit_b_16, efficientnet_b0 ({len(known)} in all: "
            "torchvision.models.list_models(module=torchvision.models))"
        )
    pp: dict[str, Any] = {
        "size": 224,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resize_mode": "shortest",
        "interpolation": "bilinear",
    }
    path: str | None = None
    if weights:
        if _is_path(weights):
            path = _abs_file(weights, f"torchvision weights for {name}")
        else:
            path, enum_pp = _torchvision_cached_weights(name, weights)
            pp.update(enum_pp)
    return _finish("torchvision", name, path, pp, None, over)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` of ``model`` (its classification head)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise EncoderError(f"{type(model).__name__} has no nn.Linear head to replace")
    return last


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace ``model``'s submodule at the dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A plain state dict of tensors from ``path`` (safetensors, or ``torch.load(weights_only=True)``);
    a ``state_dict``/``model`` wrapper is unwrapped and a DataParallel ``module.`` prefix dropped."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file...
        raise EncoderError(
            f"cannot read weights {path!r} as a plain state dict ({type(e).__name__}: {e}); save it with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"weights {path!r} are not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_torchvision(spec: EncoderSpec, device: torch.device) -> Loaded:
    """The headless torchvision network on ``device`` and its feature dimension (the head's in_features)."""
    import torchvision

    try:
        if spec.weights is None:
            warnings.warn(
                f"encoder torchvision:{spec.name} has no weights: it is a RANDOM network, so its clusters and "
                "perturbations are meaningless (fine for tests only). Give weights: "
                f"'torchvision:{spec.name}:/path/weights.pth' (made on a machine with internet by "
                f"`torch.save(torchvision.models.{spec.name}(weights='DEFAULT').state_dict(), 'weights.pth')`) "
                "or an open_clip encoder such as 'open_clip:RN50-quickgelu:/path/rn50-openai.pt'",
                RandomEncoderWarning,
                stacklevel=3,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = torchvision.models.get_model(spec.name, weights=None)
        else:
            model = torchvision.models.get_model(spec.name, weights=None)
    except ValueError as e:
        raise EncoderError(f"unknown torchvision model {spec.name!r}: {e}") from e
    head_name, head = _last_linear(model)
    dim = head.in_features
    _set_submodule(model, head_name, nn.Identity())
    if spec.weights is not None:
        path = _abs_file(spec.weights, f"torchvision weights for {spec.name}")
        sd = _load_weights_file(path)
        sd = {k: v for k, v in sd.items() if k not in (f"{head_name}.weight", f"{head_name}.bias")}
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise EncoderError(f"weights {path!r} do not fit torchvision model {spec.name!r}: {e}") from e
    return Loaded(model.to(device), dim)


register_kind(
    "torchvision",
    parse=_parse_torchvision,
    load=_load_torchvision,
    usage=("'torchvision:NAME' (random init, tests only)", "'torchvision:NAME:/path/weights.pth'"),
)


