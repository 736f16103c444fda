"""The small open_clip CLIPs the recipes train on Fashion-MNIST, saved as ``local-dir:`` bundles.

A bundle is what a user's local CLIP weights look like to ue-datasets: ``open_clip_config.json`` (the
model config and the preprocessing: 32 px, squashed, bilinear, Fashion-MNIST's pixel statistics) and
``open_clip_model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
SIZE = 32


def prep(x: torch.Tensor) -> torch.Tensor:
    """Float ``(B, 1, 28, 28)`` in [0, 1] -> the model's input: 32 px, normalised, 3 channels."""
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1)


def register(name: str, cfg: dict, bundle: Path) -> None:
    """Make ``cfg`` an open_clip model ``name`` (its config written beside ``bundle``)."""
    import open_clip

    folder = bundle.parent / "model-config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))


def spec_of(bundle: Path) -> str:
    """The encoder spec of ``bundle``."""
    return f"local-dir:{bundle.resolve()}"


def is_saved(bundle: Path) -> bool:
    return (bundle / "open_clip_model.safetensors").exists()


def save(model: torch.nn.Module, cfg: dict, bundle: Path) -> str:
    """Save ``model`` (of config ``cfg``) as a bundle; returns its spec."""
    from safetensors.torch import save_file

    bundle.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": SIZE, "mean": [MEAN] * 3, "std": [STD] * 3, "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess},
                                                             indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bundle / "open_clip_model.safetensors")
    return spec_of(bundle)
