"""Unlearnable Clusters: fit stages, the artifact, and apply through every adapter."""

from __future__ import annotations

import io
import json
import shutil

import datasets
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import encode, png_pixels, read_tar, to_chw, write_shard
from ue_datasets.apply.clusters import assign_clusters, decode_keys, fitted_table, pixel_checksum, use_encoder
from ue_datasets.apply.core import protect_batch
from ue_datasets.apply.hf import protect_dataset
from ue_datasets.apply.wds import protect_stage
from ue_datasets.artifact import Protection, load_protection
from ue_datasets.cli import main
from ue_datasets.encoders import load_encoder, parse_encoder
from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit.budget import parse_eps
from ue_datasets.fit.cluster_deltas import kl_to_center
from ue_datasets.fit.clusters import fit_clusters
from ue_datasets.fit.features import extract_features
from ue_datasets.transforms import Protect, ProtectBatch

EPS = 16 / 255
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def _images(n: int = 24, seed: int = 0) -> list[Image.Image]:
    """Three colour groups with noise, mixed sizes and modes (RGB, L, RGBA)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = [(16, 16), (20, 12), (12, 16)][i % 3]
        base = np.array(COLOURS[(i // 3) % 3], dtype=np.int16)
        arr = np.clip(base + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        if i % 8 == 5:
            img = img.convert("L")
        elif i % 8 == 7:
            img = img.convert("RGBA")
        out.append(img)
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A shard of 24 images, a tiny resnet18 encoder with saved weights, and a fast-mode fit on it."""
    import torchvision

    d = tmp_path_factory.mktemp("uc")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "rn18.pth")
    spec = f"torchvision:resnet18:{d / 'rn18.pth'}"
    pngs = [encode(im) for im in _images()]
    keys = [f"k{i:03d}" for i in range(len(pngs))]
    (d / "in").mkdir()
    shard = write_shard(str(d / "in" / "s-000.tar"),
                        [{"__key__": k, "png": b, "cls": b"0"} for k, b in zip(keys, pngs)])
    protection = fit_clusters(shard, parse_encoder(spec, size=16), clusters=3, mode="fast", epochs=2, batch_size=8,
                              resolution=8, device="cpu", progress=False)
    protection.save(d / "prot")
    return {"dir": d, "shard": shard, "pngs": pngs, "keys": keys, "protection": protection, "spec": spec}


def test_artifact_holds_centers_bounded_deltas_and_assignments_by_key(fitted):
    p = load_protection(fitted["dir"] / "prot")
    t = p.tensors
    assert p.method == "clusters" and p.params["num_clusters"] == 3
    assert t["centers"].shape == (3, 512) and t["deltas"].shape == (3, 3, 8, 8)
    assert float(t["deltas"].abs().max()) <= EPS + 1e-7
    assert decode_keys(t["keys_utf8"], t["key_offsets"]) == fitted["keys"]
    assert p.params["encoder"]["weights_digest"].startswith("sha256:")
    assert sum(p.params["cluster_sizes"]) == 24


def test_stored_and_recomputed_assignments_agree(fitted):
    p = fitted["protection"]
    x = [to_chw(Image.open(io.BytesIO(b)).convert("RGB")) if Image.open(io.BytesIO(b)).mode == "RGBA"
         else to_chw(Image.open(io.BytesIO(b))) for b in fitted["pngs"]]
    stored = [fitted_table(p)[k][0] for k in fitted["keys"]]
    recomputed = [int(assign_clusters(p, im[None])[0]) for im in x]
    assert stored == recomputed
    assert len(set(stored)) == 3  # the three colour groups


def test_minibatch_kmeans_mode_finds_the_same_groups(fitted):
    p = fit_clusters(fitted["shard"], parse_encoder(fitted["spec"], size=16), clusters=3, mode="fast", epochs=1,
                     batch_size=8, resolution=8, kmeans_mode="minibatch", device="cpu", progress=False)
    a, b = p.tensors["assignments"].tolist(), fitted["protection"].tensors["assignments"].tolist()
    assert len(set(zip(a, b))) == 3  # the same partition, up to cluster numbering
    assert p.params["kmeans_mode"] == "minibatch"


def test_a_key_naming_another_image_is_assigned_by_its_pixels(fitted):
    p = fitted["protection"]
    table = fitted_table(p)
    a = to_chw(Image.open(io.BytesIO(fitted["pngs"][0])))
    other_key = next(k for k in fitted["keys"] if table[k][0] != table[fitted["keys"][0]][0])
    assert int(assign_clusters(p, a[None], [other_key])[0]) == table[fitted["keys"][0]][0]


def test_bound_holds_after_quantisation(fitted, tmp_path):
    assert main(["protect", "--protection", str(fitted["dir"] / "prot"), "--input", fitted["shard"],
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    out = read_tar(tmp_path / "out" / "s-000.tar")
    changed = 0
    for s, b in zip(out, fitted["pngs"]):
        a, o = to_chw(Image.open(io.BytesIO(b))).int(), png_pixels(s["png"]).int()
        colour = slice(0, 3) if a.shape[0] >= 3 else slice(0, 1)
        diff = (a[colour] - o[colour]).abs()
        assert int(diff.max()) <= round(255 * EPS)
        changed += int(diff.gt(0).sum())
        if a.shape[0] == 4:
            assert torch.equal(a[3], o[3])  # alpha kept
    assert changed > 0


def test_rounding_is_half_up_and_values_clamp():
    from ue_datasets.kernels.noise import add_delta

    x = torch.tensor([0, 10, 250, 255], dtype=torch.uint8).reshape(1, 1, 1, 4)
    delta = torch.tensor([-0.5 / 255, 0.5 / 255, 16 / 255, 16 / 255]).reshape(1, 1, 1, 4)
    assert add_delta(x, delta).flatten().tolist() == [0, 11, 255, 255]


def test_adapters_give_identical_pixels(fitted, tmp_path):
    p, pngs, keys = fitted["protection"], fitted["pngs"], fitted["keys"]
    by_transform = [to_chw(Protect(p)(Image.open(io.BytesIO(b)))) for b in pngs]
    by_keyed_transform = [to_chw(Protect(p, keys_getter=lambda inp, k=k: k)(Image.open(io.BytesIO(b))))
                          for b, k in zip(pngs, keys)]
    features = datasets.Features({"image": datasets.Image(), "__key__": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "__key__": keys},
                                    features=features)
    by_map = [to_chw(im) for im in protect_dataset(ds, p, batch_size=5)["image"]]
    assert main(["protect", "--protection", str(fitted["dir"] / "prot"), "--input", fitted["shard"], "--output",
                 str(tmp_path / "out"), "--batch-size", "5", "--no-progress"]) == 0
    by_cli = [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")]
    by_stage = [png_pixels(s["png"]) for s in wds.WebDataset(fitted["shard"], shardshuffle=False)
                .compose(protect_stage(p, batch_size=3))]
    for results in (by_keyed_transform, by_map, by_cli, by_stage):
        assert len(results) == len(by_transform)
        for a, b in zip(by_transform, results):
            assert torch.equal(a, b)


def test_batch_forms_agree_with_single_images(fitted):
    p = fitted["protection"]
    x = torch.stack([to_chw(Image.open(io.BytesIO(b)).convert("RGB")) for b in fitted["pngs"][:6:3]])
    singles = torch.stack([protect_batch(p, im[None])[0] for im in x])
    assert torch.equal(ProtectBatch(p)(x)[0], singles)
    assert torch.equal(protect_batch(p, x.float() / 255), singles.float() / 255)


def test_feature_extraction_resumes_after_an_interruption(fitted, tmp_path):
    encoder = load_encoder(parse_encoder(fitted["spec"], size=16))
    calls = {"n": 0}
    real = encoder.encode

    def failing(images, batch_size=256):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(images, batch_size=batch_size)

    encoder.encode = failing
    with pytest.raises(KeyboardInterrupt):
        extract_features(fitted["shard"], encoder, tmp_path / "cache", resolution=8, batch_size=4, part_size=8,
                         progress=False)
    assert len(list((tmp_path / "cache").glob("part-*.safetensors"))) == 1
    calls["n"] = 10
    resumed = extract_features(fitted["shard"], encoder, tmp_path / "cache", resolution=8, batch_size=4,
                               part_size=8, progress=False)
    assert calls["n"] == 10 + 4  # 16 remaining samples in batches of 4; the first part was not redone
    encoder.encode = real
    fresh = extract_features(fitted["shard"], encoder, tmp_path / "fresh", resolution=8, batch_size=4,
                             part_size=8, progress=False)
    assert resumed.keys == fresh.keys == fitted["keys"]
    assert torch.allclose(resumed.features, fresh.features, atol=1e-5)
    assert torch.equal(resumed.images, fresh.images) and torch.equal(resumed.checksums, fresh.checksums)


def test_a_cache_of_another_fit_is_refused(fitted, tmp_path):
    encoder = load_encoder(parse_encoder(fitted["spec"], size=16))
    extract_features(fitted["shard"], encoder, tmp_path / "cache", resolution=8, progress=False)
    with pytest.raises(UEDatasetsError, match="another fit"):
        extract_features(fitted["shard"], encoder, tmp_path / "cache", resolution=12, progress=False)


def test_faithful_mode_trains_one_bounded_generator_per_cluster(fitted):
    p = fit_clusters(fitted["shard"], parse_encoder(fitted["spec"], size=16), clusters=2, mode="faithful",
                     epochs=1, batch_size=12, resolution=8, device="cpu", progress=False)
    d = p.tensors["deltas"]
    assert d.shape == (2, 3, 8, 8) and float(d.abs().max()) <= EPS + 1e-7
    assert not torch.equal(d[0], d[1])
    assert p.params["mode"] == "faithful" and p.params["epochs"] == 1


def test_fast_fit_resumes_from_its_checkpoint_and_cleans_only_its_own_files(fitted, tmp_path):
    from ue_datasets.fit import cluster_deltas as fc

    spec = parse_encoder(fitted["spec"], size=16)
    kw = {"clusters": 3, "batch_size": 8, "resolution": 8, "device": "cpu", "progress": False, "mode": "fast"}
    reference = fit_clusters(fitted["shard"], spec, epochs=3, cache_dir=tmp_path / "ref", **kw)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mine.txt").write_text("not the fit's")
    real, calls = fc.kl_to_center, {"n": 0}

    def interrupted(z, center):
        calls["n"] += 1
        if calls["n"] == 7:  # in the third epoch (3 batches an epoch)
            raise KeyboardInterrupt
        return real(z, center)

    fc.kl_to_center = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_clusters(fitted["shard"], spec, epochs=3, cache_dir=cache, **kw)
    finally:
        fc.kl_to_center = real
    assert (cache / "deltas-fast.safetensors").exists()
    resumed = fit_clusters(fitted["shard"], spec, epochs=3, cache_dir=cache, **kw)
    assert torch.equal(resumed.tensors["deltas"], reference.tensors["deltas"])
    assert sorted(p.name for p in cache.iterdir()) == ["mine.txt"]
    other_eps = fit_clusters(fitted["shard"], spec, epochs=3, eps=4 / 255, cache_dir=cache, keep_cache=True, **kw)
    assert float(other_eps.tensors["deltas"].abs().max()) <= 4 / 255 + 1e-7  # a stale checkpoint is not reused


def test_grayscale_data_gets_one_channel_deltas(tmp_path):
    from ue_datasets.encoders import callable_encoder

    rng = np.random.default_rng(1)
    pngs = [encode(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")) for _ in range(6)]
    shard = write_shard(str(tmp_path / "g.tar"), [{"__key__": f"g{i}", "png": b} for i, b in enumerate(pngs)])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    enc = callable_encoder(net, size=8)
    p = fit_clusters(shard, enc, clusters=2, epochs=1, batch_size=3, resolution=8, device="cpu", progress=False)
    assert p.tensors["deltas"].shape == (2, 1, 8, 8)
    out = protect_batch(p, torch.stack([to_chw(Image.open(io.BytesIO(b))) for b in pngs]), keys=[f"g{i}" for i in range(6)])
    assert out.shape == (6, 1, 8, 8)


def test_a_callable_encoder_protection_needs_the_encoder_for_new_images(tmp_path, monkeypatch):
    from ue_datasets.apply import clusters as apply_clusters
    from ue_datasets.encoders import callable_encoder

    shard = write_shard(str(tmp_path / "s.tar"), [{"__key__": f"a{i}", "png": encode(im)}
                                                  for i, im in enumerate(_images(6))])
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    p = fit_clusters(shard, callable_encoder(net, size=8), clusters=2, epochs=1, batch_size=3, resolution=8,
                     device="cpu", progress=False)
    p.save(tmp_path / "prot")
    monkeypatch.setattr(apply_clusters, "_ENCODERS", {})  # as in a new process
    loaded = load_protection(tmp_path / "prot")
    new = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match="set_encoder"):
        protect_batch(loaded, new)
    apply_clusters.set_encoder(loaded, callable_encoder(net, size=8))
    assert protect_batch(loaded, new).shape == new.shape


def _moved(fitted, tmp_path) -> Protection:
    """The fitted protection as saved before its encoder's weights were moved away (a new id)."""
    p = fitted["protection"]
    gone = {**p.params["encoder"], "weights": str(tmp_path / "gone" / "rn18.pth")}
    Protection("clusters", {**p.params, "encoder": gone}, p.tensors).save(tmp_path / "prot")
    return load_protection(tmp_path / "prot")


def test_use_encoder_points_a_clusters_artifact_at_moved_weights(fitted, tmp_path, monkeypatch):
    from ue_datasets.apply import clusters as apply_clusters

    shutil.copy(fitted["dir"] / "rn18.pth", tmp_path / "moved.pth")
    loaded = _moved(fitted, tmp_path)
    new = torch.full((1, 3, 16, 16), 90, dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match="--encoder SPEC"):
        protect_batch(loaded, new)
    # the spec's own preprocessing (224 px) gives way to the fitted one (16 px)
    moved = use_encoder(loaded, f"torchvision:resnet18:{tmp_path / 'moved.pth'}")
    assert moved.id == loaded.id and moved.params["encoder"]["weights"] == str(tmp_path / "moved.pth")
    assert moved.params["encoder"]["size"] == 16
    expected = protect_batch(fitted["protection"], new)
    assert torch.equal(protect_batch(moved, new), expected)
    monkeypatch.setattr(apply_clusters, "_ENCODERS", {})  # a spawned worker rebuilds it from the moved spec
    assert torch.equal(protect_batch(moved, new), expected)


def test_protect_encoder_option_points_the_cli_at_moved_weights(fitted, tmp_path):
    shutil.copy(fitted["dir"] / "rn18.pth", tmp_path / "moved.pth")
    _moved(fitted, tmp_path)
    new_keys = [{"__key__": f"new{i}", "png": b, "cls": b"0"} for i, b in enumerate(fitted["pngs"][:4])]
    shard = write_shard(str(tmp_path / "in" / "s.tar"), new_keys)  # keys not fitted: the encoder assigns clusters
    args = ["protect", "--protection", str(tmp_path / "prot"), "--input", shard, "--no-progress", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "out1")]) == 2  # the recorded weights are gone
    assert main([*args, "--output", str(tmp_path / "out2"),
                 "--encoder", f"torchvision:resnet18:{tmp_path / 'moved.pth'}"]) == 0
    assert main(["verify", "--protection", str(tmp_path / "prot"), "--input", str(tmp_path / "out2"), "--clean",
                 shard, "--encoder", f"torchvision:resnet18:{tmp_path / 'moved.pth'}", "--device", "cpu"]) == 0
    expected = protect_batch(fitted["protection"], [png_pixels(b) for b in fitted["pngs"][:4]])
    assert [png_pixels(s["png"]).tolist() for s in read_tar(str(tmp_path / "out2" / "s.tar"))] == [
        x.tolist() for x in expected]


def test_use_encoder_refuses_other_weights_and_other_methods(fitted, tmp_path):
    import torchvision

    from ue_datasets import fit_convolution
    from ue_datasets.encoders import EncoderError

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "other.pth")
    with pytest.raises(EncoderError, match="differ from the ones the protection was fitted with"):
        use_encoder(_moved(fitted, tmp_path), f"torchvision:resnet18:{tmp_path / 'other.pth'}")
    with pytest.raises(UEDatasetsError, match="only used by clusters protections; this one is 'convolution'"):
        use_encoder(fit_convolution(10, key=0), fitted["spec"])


def test_fit_clusters_cli_then_protect_and_inspect(fitted, tmp_path, capsys):
    out = tmp_path / "uc"
    assert main(["fit", "clusters", "--input", fitted["shard"], "--encoder", fitted["spec"], "--image-size", "16",
                 "--clusters", "3", "--mode", "fast", "--epochs", "1", "--batch-size", "8", "--resolution", "8", "--device", "cpu",
                 "-o", str(out), "--no-progress"]) == 0
    assert "fitted clusters: 24 images in 3 clusters" in capsys.readouterr().out
    assert not (tmp_path / "uc.cache").exists()
    assert main(["inspect", str(out), "--verify"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["method"] == "clusters" and manifest["params"]["encoder"]["kind"] == "torchvision"
    assert main(["protect", "--protection", str(out), "--input", fitted["shard"], "--output",
                 str(tmp_path / "p"), "--no-progress"]) == 0


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "encoder"),
    ("torchvision:not_a_model", "not_a_model"),
    ("open_clip:RN50:/no/such/file.pt", "/no/such/file.pt"),
])
def test_a_bad_encoder_spec_is_a_clear_error(fitted, tmp_path, capsys, spec, message):
    assert main(["fit", "clusters", "--input", fitted["shard"], "--encoder", spec, "-o", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ue-datasets: error:" in err and message in err


def test_eps_parsing_and_the_kl_objective():
    assert parse_eps("16/255") == pytest.approx(16 / 255)
    assert parse_eps(0.5) == 0.5
    with pytest.raises(UEDatasetsError):
        parse_eps("2")
    z = torch.randn(4, 6)
    assert torch.allclose(kl_to_center(z, z), torch.zeros(4), atol=1e-6)
    assert bool((kl_to_center(z, torch.randn(6)) > 0).all())


def test_pixel_checksum_tells_images_apart_and_is_exact():
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    s = pixel_checksum(x)
    assert s.shape == (5, 2) and len({tuple(v) for v in s.tolist()}) == 5
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    assert not torch.equal(pixel_checksum(y)[0], s[0])
    assert torch.equal(pixel_checksum(x[:2]), s[:2])
