"""Surrogate encoders: spec parsing, offline loading (open_clip file / bundle / cached tag,
torchvision, callables), preprocessing, digests and fast failure without network.

Everything uses a tiny open_clip config registered here (3.4M parameters, 32-px input) and
torchvision resnet18 at 32 px, so the file runs in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from conftest import save_clip_bundle, tiny_clip
from safetensors.torch import save_file

from ue_datasets.encoders import (
    Encoder,
    EncoderError,
    EncoderSpec,
    RandomEncoderWarning,
    callable_encoder,
    load_encoder,
    parse_encoder,
)
from ue_datasets.errors import UEDatasetsError

TINY = "ue-tiny-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Registers the tiny config with open_clip; returns a randomly initialised model of it."""
    return tiny_clip(tmp_path_factory.mktemp("tiny_cfg"), TINY, TINY_CFG)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pt"
    torch.save(tiny_model.state_dict(), p)
    return p


@pytest.fixture(scope="module")
def tiny_encoder(tiny_ckpt):
    return load_encoder(parse_encoder(f"open_clip:{TINY}:{tiny_ckpt}"))


@pytest.fixture(scope="module")
def resnet18_state():
    import torchvision

    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def _images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        for h, w in [(32, 32), (40, 52), (64, 36), (40, 52)]
    ]


# ------------------------------------------------------------------------------------------ open_clip


def test_open_clip_checkpoint_file(tiny_model, tiny_ckpt, tiny_encoder):
    enc = tiny_encoder
    spec = enc.spec
    assert isinstance(enc, Encoder) and spec.kind == "open_clip" and spec.name == TINY
    assert spec.weights == str(tiny_ckpt.resolve())
    assert spec.size == 32 and spec.mean == OPENAI_MEAN and spec.resize_mode == "shortest"
    assert spec.interpolation == "bicubic"
    assert spec.model_config["embed_dim"] == 32
    assert spec.weights_digest.startswith("sha256:")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    assert enc.dim == 32

    x = torch.rand(3, 3, 32, 32)
    z = enc(x)
    assert z.shape == (3, 32) and z.dtype == torch.float32
    # same as open_clip's own image tower on our normalisation (no resize at 32 px)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tiny_model.encode_image((x - mean) / std, normalize=False)
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)

    ims = _images()
    both = enc.encode(ims, batch_size=3)
    assert both.shape == (4, 32) and both.device.type == "cpu" and not both.is_inference()
    alone = torch.cat([enc.encode([im]) for im in ims])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.encode(ims[::-1]), both.flip(0), atol=1e-5, rtol=0)  # input order kept
    floats = enc.encode([im.float() / 255 for im in ims])
    torch.testing.assert_close(both, floats, atol=1e-5, rtol=1e-5)
    batch = torch.stack([ims[1], ims[3]])
    torch.testing.assert_close(enc.encode(batch, batch_size=1), both[[1, 3]], atol=1e-5, rtol=0)
    assert enc.encode([]).shape == (0, 32)


def test_open_clip_safetensors_checkpoint_same_digest(tiny_model, tiny_encoder, tmp_path):
    p = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(p))
    enc = load_encoder(f"open_clip:{TINY}:{p}")
    assert enc.spec.weights_digest == tiny_encoder.spec.weights_digest
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), tiny_encoder(x))


def test_local_dir_bundle(tiny_model, tmp_path):
    model = open_clip.create_model(
        TINY,
        pretrained=None,
        force_preprocess_cfg={
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
            "resize_mode": "squash",
            "interpolation": "bilinear",
        },
    )
    model.load_state_dict(tiny_model.state_dict())
    d = save_clip_bundle(model, TINY_CFG, tmp_path / "bundle")

    for s in (f"local-dir:{d}", f"open_clip:local-dir:{d}"):
        spec = parse_encoder(s)
        assert spec.name == f"local-dir:{d.resolve()}" and spec.weights is None
        assert (spec.size, spec.mean, spec.std) == (32, (0.5,) * 3, (0.5,) * 3)
        assert (spec.resize_mode, spec.interpolation) == ("squash", "bilinear")
        assert spec.model_config["embed_dim"] == 32
    enc = load_encoder(spec)
    x = torch.rand(2, 3, 48, 40)
    assert enc.preprocess(x).shape == (2, 3, 32, 32)
    # the same weights as a checkpoint file, with the bundle's preprocessing given explicitly
    torch.save(tiny_model.state_dict(), tmp_path / "x.pt")
    same = load_encoder(
        parse_encoder(
            f"open_clip:{TINY}:{tmp_path / 'x.pt'}",
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            resize_mode="squash",
            interpolation="bilinear",
        )
    )
    torch.testing.assert_close(enc(x), same(x))
    assert enc.spec.weights_digest == same.spec.weights_digest

    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(EncoderError, match="no weights"):
        parse_encoder(f"local-dir:{d}")


def test_cached_tag_loads_offline_with_tag_preprocessing(tiny_model, tmp_path, monkeypatch):
    """A tag whose weights sit in the Hugging Face cache loads offline and brings its preprocessing."""
    from huggingface_hub import constants
    from open_clip import pretrained as ocp

    tag_cfg = {
        "url": "",
        "hf_hub": "ue-test/tiny-clip/",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    monkeypatch.setitem(ocp._PRETRAINED, TINY, {"tiny": tag_cfg})
    cache = tmp_path / "hf"
    snap = cache / "models--ue-test--tiny-clip" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (cache / "models--ue-test--tiny-clip" / "refs").mkdir()
    (cache / "models--ue-test--tiny-clip" / "refs" / "main").write_text("0" * 40)
    save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()},
        str(snap / "open_clip_model.safetensors"),
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    spec = parse_encoder(f"open_clip:{TINY}:tiny")
    assert spec.weights == "tiny"
    assert (spec.mean, spec.resize_mode, spec.interpolation) == ((0.5,) * 3, "squash", "bilinear")
    enc = load_encoder(spec)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_model.encode_image((x - 0.5) / 0.5)
    torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)


def test_spec_json_round_trip_and_digest(tiny_encoder, monkeypatch):
    from open_clip import factory

    spec = tiny_encoder.spec
    d = json.loads(json.dumps(spec.to_json()))
    back = EncoderSpec.from_json(d)
    assert back == spec and isinstance(back.mean, tuple)
    assert hash(back) == hash(spec)

    # another process does not know the tiny config: the spec's model_config rebuilds it
    monkeypatch.delitem(factory._MODEL_CONFIGS, TINY)
    again = load_encoder(back)
    assert again.spec.weights_digest == spec.weights_digest

    bad = EncoderSpec.from_json({**d, "weights_digest": "sha256:" + "0" * 64})
    with pytest.raises(EncoderError, match="differ"):
        load_encoder(bad)
    with pytest.raises(EncoderError, match="unknown encoder spec fields"):
        EncoderSpec.from_json({**d, "colour": 1})


def test_quick_gelu_tag_recorded_in_model_config():
    # open_clip only *warns* when an OpenAI (QuickGELU) tag meets a GELU config; the spec fixes it
    spec = parse_encoder("open_clip:ViT-B-32:openai")
    assert spec.model_config["quick_gelu"] is True
    assert spec.size == 224 and spec.mean == OPENAI_MEAN


# ------------------------------------------------------------------------------------- fail fast


def test_unfetchable_tag_fails_fast_offline():
    t0 = time.monotonic()
    with pytest.raises(EncoderError) as ei:
        load_encoder("open_clip:RN50:openai")
    assert time.monotonic() - t0 < 15
    msg = str(ei.value)
    assert "RN50" in msg and "openai" in msg and "local" in msg
    # OpenAI weights need the QuickGELU config with a checkpoint file, as the README says
    assert "open_clip:RN50-quickgelu:/path/to/checkpoint.pt" in msg and "QuickGELU" in msg
    assert "create_model('RN50-quickgelu', pretrained='openai')" in msg
    assert "local-dir:" in msg and "torchvision:resnet50:/path/weights.pth" in msg
    assert isinstance(ei.value, UEDatasetsError)


def test_a_gelu_tag_keeps_its_model_name_in_the_checkpoint_hint():
    with pytest.raises(EncoderError) as ei:
        load_encoder("open_clip:ViT-B-32:laion2b_s34b_b79k")
    msg = str(ei.value)
    assert "open_clip:ViT-B-32:/path/to/checkpoint.pt" in msg and "quickgelu" not in msg.lower()


def test_unfetchable_tag_fails_fast_without_offline_flag(monkeypatch):
    from huggingface_hub import constants

    from ue_datasets.encoders import _reachable

    if _reachable(constants.ENDPOINT)[0]:
        pytest.skip("the Hugging Face Hub is reachable: this test would download RN50")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.monotonic()
    with pytest.raises(EncoderError, match="unreachable") as ei:
        load_encoder("open_clip:RN50:openai")
    assert time.monotonic() - t0 < 20
    assert "open_clip:RN50-quickgelu:/path/to/checkpoint.pt" in str(ei.value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("foo", "accepted encoder specs"),
        ("", "accepted encoder specs"),
        ("open_clip:", "missing open_clip model name"),
        ("open_clip:RN50", "random initialisation is not allowed"),
        ("open_clip:not-a-model:openai", "unknown open_clip model 'not-a-model'.*ViT-B-32"),
        ("open_clip:RN50:no_such_tag", "neither a pretrained tag"),
        ("open_clip:RN50:/no/such/checkpoint.pt", "not found: '/no/such/checkpoint.pt'"),
        ("open_clip:RN50:ckpt.safetensors", "ckpt.safetensors"),
        ("torchvision:not_a_model", "unknown torchvision classification model 'not_a_model'"),
        ("torchvision:resnet18:/no/such/weights.pth", "/no/such/weights.pth"),
        ("local-dir:/no/such/dir", "/no/such/dir"),
        ("hf:foo", "accepted encoder specs"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(EncoderError, match=match):
        parse_encoder(spec)


def test_bad_spec_values():
    with pytest.raises(EncoderError, match="resize_mode"):
        parse_encoder("torchvision:resnet18", resize_mode="longest")
    with pytest.raises(EncoderError, match="mean"):
        parse_encoder("torchvision:resnet18", mean=(0.5, 0.5))
    with pytest.raises(EncoderError, match="callable"):
        load_encoder(callable_encoder(lambda x: x.mean((2, 3)), size=8).spec)


# ----------------------------------------------------------------------------------- torchvision


def test_torchvision_full_classifier_weights(resnet18_state, tmp_path):
    p = tmp_path / "r18.pth"
    torch.save(resnet18_state, p)
    spec = parse_encoder(f"torchvision:resnet18:{p}", size=32)
    assert spec.kind == "torchvision" and spec.weights == str(p.resolve())
    assert spec.mean == (0.485, 0.456, 0.406) and spec.interpolation == "bilinear"
    enc = load_encoder(spec)
    assert enc.dim == 512
    assert isinstance(enc.model.fc, nn.Identity)
    z = enc(torch.rand(2, 3, 40, 48))
    assert z.shape == (2, 512)

    # the feature model's state dict (fc removed), as safetensors, loads to the same weights
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(st))
    enc2 = load_encoder(parse_encoder(f"torchvision:resnet18:{st}", size=32))
    assert enc2.spec.weights_digest == enc.spec.weights_digest
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(enc2(x), enc(x))

    # a fine-tuned classifier with another head size loads too (the head is dropped)
    other = dict(resnet18_state, **{"fc.weight": torch.zeros(37, 512), "fc.bias": torch.zeros(37)})
    torch.save(other, tmp_path / "r18_37.pth")
    assert (
        load_encoder(
            parse_encoder(f"torchvision:resnet18:{tmp_path / 'r18_37.pth'}", size=32)
        ).spec.weights_digest
        == enc.spec.weights_digest
    )


def test_torchvision_bad_weights_and_random_init(resnet18_state, tmp_path):
    bad = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match="do not fit"):
        load_encoder(parse_encoder(f"torchvision:resnet18:{tmp_path / 'bad.pth'}", size=32))
    torch.save({"net": nn.Linear(2, 2)}, tmp_path / "pickle.pth")
    with pytest.raises(EncoderError, match="plain state dict"):
        load_encoder(parse_encoder(f"torchvision:resnet18:{tmp_path / 'pickle.pth'}", size=32))
    # random init is seeded: two loads agree (usable only in tests)
    with pytest.warns(RandomEncoderWarning):
        a = load_encoder(parse_encoder("torchvision:resnet18", size=32))
    with pytest.warns(RandomEncoderWarning):
        b = load_encoder(parse_encoder("torchvision:resnet18", size=32))
    assert a.spec.weights is None and a.spec.weights_digest == b.spec.weights_digest


def test_a_torchvision_encoder_without_weights_warns_that_it_is_random():
    with pytest.warns(RandomEncoderWarning) as caught:
        load_encoder("torchvision:resnet18")
    msg = str(caught[0].message)
    assert "RANDOM network" in msg and "meaningless" in msg and "tests only" in msg
    assert "torchvision:resnet18:/path/weights.pth" in msg
    assert issubclass(RandomEncoderWarning, UserWarning)


def test_an_encoder_with_weights_does_not_warn(resnet18_state, tmp_path, recwarn):
    torch.save(resnet18_state, tmp_path / "r18.pth")
    load_encoder(parse_encoder(f"torchvision:resnet18:{tmp_path / 'r18.pth'}", size=32))
    assert not [w for w in recwarn if issubclass(w.category, RandomEncoderWarning)]


# -------------------------------------------------------------------------------------- callables


def test_callable_module_and_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    enc = callable_encoder(net, size=8, name="tiny-net")
    assert enc.spec.kind == "callable" and enc.spec.name == "tiny-net"
    assert enc.spec.weights_digest.startswith("sha256:")
    assert "model.1.weight" in dict(enc.named_parameters())
    assert enc.dim == 5
    x = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8)
    assert enc.encode(x).shape == (4, 5)

    fn_enc = callable_encoder(lambda t: t.mean(dim=(2, 3)), size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert fn_enc.spec.weights_digest is None and fn_enc.dim == 3
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(fn_enc(flat), torch.full((1, 3), 0.25))


# ---------------------------------------------------------------------------------- preprocessing


def test_preprocess_channels_shapes_and_gradient(tiny_encoder):
    enc = tiny_encoder
    g = torch.randint(0, 256, (2, 1, 40, 50), dtype=torch.uint8)
    pre = enc.preprocess(g)
    assert pre.shape == (2, 3, 32, 32) and pre.dtype == torch.float32
    torch.testing.assert_close(pre, enc.preprocess(g.repeat(1, 3, 1, 1)))
    la = torch.cat([g, torch.zeros_like(g)], dim=1)
    torch.testing.assert_close(enc.preprocess(la), pre)
    rgb = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    rgba = torch.cat([rgb, torch.full_like(g, 255)], dim=1)
    torch.testing.assert_close(enc.preprocess(rgba), enc.preprocess(rgb))
    torch.testing.assert_close(enc.preprocess(rgb), enc.preprocess(rgb.float() / 255))

    x = torch.rand(2, 3, 36, 44, requires_grad=True)
    enc(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    with pytest.raises(EncoderError, match="channels"):
        enc.preprocess(torch.zeros(1, 5, 8, 8))
    with pytest.raises(EncoderError, match="uint8 or float"):
        enc.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(EncoderError, match=r"\(B, C, H, W\)"):
        enc.preprocess(torch.zeros(3, 8, 8))


def test_resize_modes():
    ident = callable_encoder(
        lambda t: t.flatten(1), size=4, mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest"
    )
    # a 4x8 image: "shortest" keeps the middle 4 columns, "squash" keeps every other column
    x = torch.arange(32, dtype=torch.float32).view(1, 1, 4, 8).expand(1, 3, 4, 8) / 32
    shortest = ident.preprocess(x)
    torch.testing.assert_close(shortest[0, 0], x[0, 0, :, 2:6])
    sq = callable_encoder(
        lambda t: t.flatten(1),
        size=4,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        interpolation="nearest",
        resize_mode="squash",
    )
    assert sq.preprocess(x).shape == (1, 3, 4, 4)
    torch.testing.assert_close(sq.preprocess(x)[0, 0], x[0, 0, :, ::2])


# ----------------------------------------------------------------------------------------- registry


def test_registry_lists_the_kinds_and_refuses_duplicates():
    from ue_datasets.encoders import KINDS, list_encoder_kinds, parse_spec_name, register_kind

    assert list_encoder_kinds() == KINDS == ("open_clip", "torchvision", "callable", "packaged", "pixels")
    assert parse_spec_name("open_clip:RN50:openai") == ("open_clip", "RN50:openai")
    assert parse_spec_name("pixels") == ("pixels", None)
    assert parse_spec_name("pixels:") == ("pixels", "")
    for taken in ("pixels", "local-dir"):
        with pytest.raises(EncoderError, match="already registered"):
            register_kind(taken, parse=None, load=lambda spec, device: None)
    with pytest.raises(EncoderError, match="encoder kind must be one of"):
        EncoderSpec(kind="nope", name="x", weights=None, size=8, mean=(0, 0, 0), std=(1, 1, 1))


def test_a_registered_kind_parses_loads_and_round_trips(monkeypatch):
    from ue_datasets.encoders import list_encoder_kinds, register_kind, registry

    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # registered for this test only
    monkeypatch.setattr(registry, "_PREFIXES", dict(registry._PREFIXES))

    def parse(rest, over):
        return EncoderSpec(kind="mean-colour", name=rest or "rgb", weights=None, size=4, mean=(0, 0, 0),
                           std=(1, 1, 1), resize_mode="squash", interpolation="bilinear")

    def load(spec, device):
        return registry.Loaded(nn.Identity(), dim=3, features=lambda model, x: model(x).mean((2, 3)))

    register_kind("mean-colour", parse=parse, load=load, usage=("'mean-colour:NAME'",))
    assert list_encoder_kinds()[-1] == "mean-colour"
    with pytest.raises(EncoderError, match="'mean-colour:NAME'"):
        parse_encoder("nope:x")
    enc = load_encoder("mean-colour:rgb")
    assert enc.spec.kind == "mean-colour" and enc.spec.weights_digest.startswith("sha256:") and enc.dim == 3
    torch.testing.assert_close(enc(torch.full((2, 3, 6, 6), 0.25)), torch.full((2, 3), 0.25))
    assert EncoderSpec.from_json(enc.spec.to_json()) == enc.spec


# ------------------------------------------------------------------------------------------- pixels


def test_pixels_spec_shape_and_values(recwarn):
    from ue_datasets.encoders import PIXELS_DIGEST

    spec = parse_encoder("pixels")
    assert (spec.kind, spec.name, spec.weights, spec.size) == ("pixels", "pixels", None, 28)
    assert (spec.mean, spec.std) == ((0.5,) * 3, (0.5,) * 3)
    assert (spec.resize_mode, spec.interpolation) == ("squash", "bilinear")
    enc = load_encoder(spec)
    assert enc.spec.weights_digest == PIXELS_DIGEST and PIXELS_DIGEST.startswith("sha256:")
    assert enc.dim == 28 * 28 and not any(True for _ in enc.parameters())
    assert not [w for w in recwarn if issubclass(w.category, RandomEncoderWarning)]  # not a network

    z = enc(torch.rand(3, 3, 40, 50))
    assert z.shape == (3, 784) and z.dtype == torch.float32
    # a gray image gives its own SIZE x SIZE normalised pixels; RGB averages the normalised channels
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(enc(gray), ((gray.float() / 255 - 0.5) / 0.5).flatten(1))
    rgb = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(enc(rgb), ((rgb - 0.5) / 0.5).mean(1).flatten(1))
    assert enc.encode([torch.rand(3, 30, 20), torch.rand(1, 28, 28)]).shape == (2, 784)

    small = load_encoder("pixels:16")
    assert small.spec.size == 16 and small(torch.rand(1, 3, 28, 28)).shape == (1, 256)
    assert parse_encoder("pixels", size=8).size == 8  # keyword overrides win, as for every kind
    for bad in ("pixels:abc", "pixels:0", "pixels:-3", "pixels:2.5"):
        with pytest.raises(EncoderError, match="positive integer"):
            parse_encoder(bad)


def test_pixels_is_deterministic_and_differentiable():
    a, b = load_encoder("pixels"), load_encoder("pixels")
    x = torch.rand(4, 3, 33, 47)
    assert torch.equal(a(x), b(x)) and a.spec == b.spec
    x = torch.rand(2, 3, 36, 44, requires_grad=True)
    a(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pixels_json_round_trip_and_load_from_spec():
    enc = load_encoder(parse_encoder("pixels:12"))
    d = json.loads(json.dumps(enc.spec.to_json()))
    assert d["kind"] == "pixels" and d["weights"] is None and d["size"] == 12
    back = EncoderSpec.from_json(d)
    assert back == enc.spec
    again = load_encoder(back)  # rebuilt from its spec, digest checked
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(again(x), enc(x))
    with pytest.raises(EncoderError, match="differ"):
        load_encoder(EncoderSpec.from_json({**d, "weights_digest": "sha256:" + "0" * 64}))
    assert load_encoder(back, "cpu").device.type == "cpu"
