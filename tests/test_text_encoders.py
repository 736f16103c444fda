"""Text encoders (`load_text_encoder`): the text tower of a tiny open_clip CLIP, loaded offline from a
checkpoint file and from a ``local-dir:`` bundle, with the same digest as the image encoder."""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from conftest import save_clip_bundle, tiny_clip

from ue_datasets.encoders import (
    EncoderError,
    EncoderSpec,
    TextEncoder,
    load_encoder,
    load_text_encoder,
    parse_encoder,
)

TINY = "ue-tiny-text-test"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEXTS = ["a photo of a cat", "a photo of a dog", "an airplane", "a photo of a cat", "", "a truck", "a truck"]


pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny_text_cfg"), TINY, TINY_CFG)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny_text_ckpt") / "tiny.pt"
    torch.save(tiny_model.state_dict(), p)
    return p


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    return save_clip_bundle(tiny_model, TINY_CFG, tmp_path_factory.mktemp("tiny_text_bundle"))


@pytest.fixture(scope="module")
def text_enc(tiny_ckpt):
    return load_text_encoder(f"open_clip:{TINY}:{tiny_ckpt}")


def _reference(model, texts):
    tok = open_clip.get_tokenizer(TINY)(texts)
    with torch.no_grad():
        return model.encode_text(tok, normalize=False).float()


def test_checkpoint_encode_matches_open_clip(tiny_model, text_enc):
    enc = text_enc
    assert isinstance(enc, TextEncoder)
    assert enc.spec.kind == "open_clip" and enc.spec.weights_digest.startswith("sha256:")
    assert enc.dim == 16 and enc.device == torch.device("cpu") and enc.context_length == 77
    tok = enc.tokenize(TEXTS)
    assert tok.dtype == torch.long and tok.shape == (len(TEXTS), 77)
    z = enc.encode(TEXTS)
    assert z.dtype == torch.float32 and z.shape == (len(TEXTS), 16) and z.device.type == "cpu"
    assert not z.is_inference() and not z.requires_grad
    torch.testing.assert_close(z, _reference(tiny_model, TEXTS))
    torch.testing.assert_close(enc.encode(TEXTS), z, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(enc(tok), z)
    # order kept, batch size irrelevant
    rev = TEXTS[::-1]
    torch.testing.assert_close(enc.encode(rev), z.flip(0))
    for bs in (1, 2, 3, 100):
        torch.testing.assert_close(enc.encode(TEXTS, batch_size=bs), z, rtol=1e-5, atol=1e-6)
    zn = enc.encode(TEXTS, normalize=True)
    torch.testing.assert_close(zn, torch.nn.functional.normalize(z, dim=-1))
    assert enc.encode([]).shape == (0, 16)


def test_frozen(text_enc):
    enc = text_enc
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training


def test_encode_cached_encodes_each_distinct_text_once(tiny_ckpt, monkeypatch):
    enc = load_text_encoder(f"open_clip:{TINY}:{tiny_ckpt}")
    ref = enc.encode(TEXTS)
    rows = []
    orig = enc.model.encode_text

    def counting(tokens, normalize=False):
        rows.append(tokens.shape[0])
        return orig(tokens, normalize=normalize)

    monkeypatch.setattr(enc.model, "encode_text", counting)
    got = enc.encode_cached(TEXTS, batch_size=2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert sum(rows) == len(set(TEXTS))
    torch.testing.assert_close(enc.encode_cached(TEXTS, normalize=True), torch.nn.functional.normalize(ref, dim=-1))
    assert sum(rows) == len(set(TEXTS))  # cached across calls
    enc.encode_cached(["a new prompt", "a photo of a dog"])
    assert sum(rows) == len(set(TEXTS)) + 1
    enc.clear_cache()
    enc.encode_cached(["a photo of a dog"])
    assert sum(rows) == len(set(TEXTS)) + 2


def test_digest_equals_image_encoder(tiny_ckpt, text_enc):
    spec = parse_encoder(f"open_clip:{TINY}:{tiny_ckpt}")
    img = load_encoder(spec)
    assert text_enc.spec.weights_digest == img.spec.weights_digest
    assert text_enc.spec == img.spec
    # the image encoder's recorded spec (JSON round trip, digest set) loads the text encoder too
    again = load_text_encoder(EncoderSpec.from_json(json.loads(json.dumps(img.spec.to_json()))))
    assert again.spec.weights_digest == img.spec.weights_digest


def test_wrong_digest_refused(text_enc):
    bad = EncoderSpec.from_json({**text_enc.spec.to_json(), "weights_digest": "sha256:" + "0" * 64})
    with pytest.raises(EncoderError, match="differ"):
        load_text_encoder(bad)


def test_local_dir_bundle(tiny_model, bundle, text_enc):
    for s in (f"local-dir:{bundle}", f"open_clip:local-dir:{bundle}"):
        enc = load_text_encoder(s)
        assert enc.spec.name == f"local-dir:{bundle.resolve()}"
        assert type(enc.tokenizer).__name__ == "SimpleTokenizer" and enc.context_length == 77
        torch.testing.assert_close(enc.encode(TEXTS), _reference(tiny_model, TEXTS))
        assert enc.spec.weights_digest == load_encoder(s).spec.weights_digest
    assert enc.spec.weights_digest == text_enc.spec.weights_digest  # same weights as the checkpoint


def test_non_open_clip_refused():
    for s in ("pixels", "pixels:16", "torchvision:resnet18"):
        with pytest.raises(EncoderError, match="text encoders are open_clip models; got kind"):
            load_text_encoder(s)
    with pytest.raises(EncoderError, match="got kind 'pixels'"):
        load_text_encoder(parse_encoder("pixels"))


def test_bad_inputs(text_enc):
    with pytest.raises(EncoderError, match="sequence of strings"):
        text_enc.encode("a cat")
    with pytest.raises(EncoderError, match="strings"):
        text_enc.encode(["a cat", 3])
    with pytest.raises(EncoderError, match="batch_size"):
        text_enc.encode(["a cat"], batch_size=0)


def test_hf_tokenizer_not_cached_refused(tiny_model, tmp_path):
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["text_cfg"]["hf_tokenizer_name"] = "ue-test/no-such-tokenizer"
    p = tmp_path / "ckpt.pt"
    torch.save(tiny_model.state_dict(), p)
    spec = EncoderSpec.from_json({**parse_encoder(f"open_clip:{TINY}:{p}").to_json(), "model_config": cfg})
    with pytest.raises(EncoderError, match="tokenizer"):
        load_text_encoder(spec)


def test_encode_cached_keeps_at_most_cache_size_texts(tiny_ckpt):
    enc = load_text_encoder(f"open_clip:{TINY}:{tiny_ckpt}")
    enc.cache_size = 2
    texts = ["one", "two", "three", "two"]
    got = enc.encode_cached(texts)
    torch.testing.assert_close(got, enc.encode(texts))
    assert len(enc._cache) == 2
