"""Error-minimising noise (EM): the PGD step, the min-min loop, class-wise deltas, sample-wise banks, resume."""

from __future__ import annotations

import io
import json
import math
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import encode, write_shard
from PIL import Image

from ue_datasets.audit.models import build_model
from ue_datasets.errors import SampleError, UEDatasetsError
from ue_datasets.fit import em, minmin
from ue_datasets.fit.em import fit_em, quantise_levels
from ue_datasets.fit.pgd import min_min_attack
from ue_datasets.kernels.samples import pixel_checksum

EPS = 8 / 255
#: A tiny, fast fit: small-cnn on CPU, few steps.
FAST = {"surrogate": "small-cnn", "device": "cpu", "batch_size": 16, "train_steps": 3, "progress": False}


def _shard(path, n: int = 48, classes: int = 3, sizes=((12, 12),), mode: str = "L", labels=None, seed: int = 0) -> str:
    """A webdataset shard of ``n`` random PNG images (class-dependent brightness) and their ``cls``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        label = i % classes
        shape = (h, w) if mode == "L" else (h, w, 3)
        arr = np.clip(rng.integers(0, 200, shape) + 20 * label, 0, 255).astype(np.uint8)
        cls = str(label if labels is None else labels[i]).encode()
        samples.append({"__key__": f"k{i:04d}", "png": encode(Image.fromarray(arr, mode)), "cls": cls})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_shard(str(path), samples)


def _pixels(shard: str) -> tuple[list[str], torch.Tensor]:
    """Keys and `pixel_checksum` of a shard's images, decoded independently of the package."""
    import tarfile

    keys, sums = [], []
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.name.endswith(".png"):
                arr = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())), dtype=np.uint8)
                t = torch.from_numpy(arr.copy())
                t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
                keys.append(m.name.split(".")[0])
                sums.append(pixel_checksum(t[None]))
    return keys, torch.cat(sums)


@pytest.fixture(autouse=True)
def _temporary_dirs_in_tmp_path(tmp_path, monkeypatch):
    """Default caches and noise banks (temporary directories; banks are kept) go under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return _shard(tmp_path_factory.mktemp("em") / "in" / "s-000.tar")


def _levels(protection) -> list[torch.Tensor]:
    bank = protection.bank
    return bank.levels(torch.arange(bank.entries))


def test_pgd_step_keeps_the_bound_and_the_range_and_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("small-cnn", 3, 1, 12)
    x = torch.rand(8, 1, 12, 12)
    x[:, :, :3] = 0.0  # pixels at the edges of the range
    x[:, :, -3:] = 1.0
    y = torch.arange(8) % 3
    before = F.cross_entropy(model.eval()(x), y)
    model.train()
    delta = min_min_attack(model, x, y, torch.zeros_like(x), EPS, 1 / 255, 10)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert delta.abs().max() <= EPS + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert F.cross_entropy(model.eval()(x + delta), y) < before
    mask = torch.zeros(8, 1, 12, 12)
    mask[:, :, 4:6, 4:6] = 1
    masked = min_min_attack(model, x, y, torch.zeros_like(x), EPS, 1 / 255, 5, mask)
    assert bool((masked[(mask == 0).expand_as(masked)] == 0).all()) and masked.abs().max() > 0


@pytest.mark.parametrize("mode", ["classwise", "samplewise"])
def test_min_min_loop_lowers_the_surrogate_loss_over_rounds(tmp_path, mode):
    """On images without any class signal, the noise is what lets the surrogate's loss fall: lower
    after three rounds than after the first, and lower than the same fit's with almost no noise."""
    rng = np.random.default_rng(0)
    shard = write_shard(str(tmp_path / "random.tar"), [
        {"__key__": f"k{i:04d}", "png": encode(Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L")),
         "cls": str(i % 3).encode()} for i in range(48)])
    options = {**FAST, "mode": mode, "max_rounds": 3, "stop_accuracy": 1.0, "subset": 0.5, "train_steps": 10,
               "lr": 0.01, "pgd_steps": 5 if mode == "samplewise" else 3}
    losses = fit_em(shard, **options).params["loss_history"]
    without = fit_em(shard, **options, eps=1e-6, step_size=1e-6).params["loss_history"]
    assert losses[2] < losses[0] - 0.1
    assert losses[2] < without[2] - 0.1


def test_classwise_deltas_are_bounded_by_eps_and_the_stop_reason_is_recorded(shard):
    p = fit_em(shard, mode="classwise", max_rounds=1, stop_accuracy=1.0, **{**FAST, "train_steps": 1})
    d = p.tensors["deltas"]
    assert d.dtype == torch.float32 and tuple(d.shape) == (3, 1, 12, 12)
    assert d.abs().max() <= EPS + 1e-7 and d.abs().max() > 0
    assert p.method == "em" and p.params["lookup"] == "class" and p.params["mode"] == "classwise"
    assert p.params["stopped"] == "max_rounds" and p.params["rounds"] == 1
    assert p.params["pgd_steps"] == 1 and p.params["rounding"] == "half-up" and p.params["resolution"] == 12
    early = fit_em(shard, mode="classwise", max_rounds=5, stop_accuracy=0.01, **FAST)
    assert early.params["stopped"] == "accuracy" and early.params["rounds"] == 1
    legacy = fit_em(shard, mode="classwise", max_rounds=1, legacy_clamp=True, **FAST)
    assert legacy.params["legacy_clamp"] is True and legacy.params["rounding"] == "truncate"


def test_classwise_images_of_several_sizes_need_a_resolution(tmp_path):
    mixed = _shard(tmp_path / "in" / "mixed.tar", n=24, sizes=((12, 12), (10, 14)), mode="RGB")
    with pytest.raises(UEDatasetsError, match="resolution"):
        fit_em(mixed, mode="classwise", max_rounds=1, **FAST)
    p = fit_em(mixed, mode="classwise", max_rounds=1, resolution=8, **FAST)
    assert tuple(p.tensors["deltas"].shape) == (3, 3, 8, 8)


def test_samplewise_bank_finds_every_sample_and_bounds_its_levels(shard, tmp_path):
    p = fit_em(shard, mode="samplewise", max_rounds=2, pgd_steps=4, step_size="2/255", bank_dir=tmp_path / "bank",
               **FAST)
    keys, sums = _pixels(shard)
    rows = p.bank.find(keys, sums)
    assert bool((rows >= 0).all()) and p.bank.entries == len(keys) == p.params["samples"]
    assert p.params["lookup"] == "key" and p.params["bank"] == {"entries": p.bank.entries, "digest": p.bank.digest}
    assert p.tensors == {} and p.params["pgd_steps"] == 4
    levels = p.bank.levels(rows)
    bound = math.floor(255 * EPS + 0.5)
    assert all(t.dtype == torch.int8 and tuple(t.shape) == (1, 12, 12) for t in levels)
    assert max(int(t.abs().max()) for t in levels) == bound  # sign steps reach the bound
    assert p.bank.find(["k0000"], sums[1:2]).item() == -1  # another image under a known key
    legacy = fit_em(shard, mode="samplewise", max_rounds=1, pgd_steps=4, legacy_clamp=True, **FAST)
    assert min(int(t.min()) for t in _levels(legacy)) == 0
    assert legacy.params["rounding"] == "truncate"


def test_quantise_levels_rounds_half_up_or_drops_negative_noise():
    d = torch.tensor([-8, -2.5, -0.4, 0.5, 2.49, 8]) / 255
    assert quantise_levels(d).tolist() == [-8, -2, 0, 1, 2, 8]
    assert quantise_levels(d, legacy_clamp=True).tolist() == [0, 0, 0, 0, 2, 8]


def _interrupt(monkeypatch, after_checkpoints: int, pgd_calls: int | None = None) -> None:
    """Make the fit die: after ``after_checkpoints`` checkpoints, or at PGD call ``pgd_calls`` after them."""
    written, calls = [0], [0]
    real_checkpoint, real_attack = minmin.write_checkpoint, minmin.min_min_attack

    def checkpoint(*args, **kwargs):
        real_checkpoint(*args, **kwargs)
        written[0] += 1
        if pgd_calls is None and written[0] == after_checkpoints:
            raise KeyboardInterrupt("killed")

    def attack(*args, **kwargs):
        if pgd_calls is not None and written[0] == after_checkpoints:
            calls[0] += 1
            if calls[0] == pgd_calls:
                raise KeyboardInterrupt("killed mid-round")
        return real_attack(*args, **kwargs)

    monkeypatch.setattr(minmin, "write_checkpoint", checkpoint)
    monkeypatch.setattr(minmin, "min_min_attack", attack)


@pytest.mark.parametrize("mode,pgd_calls", [("classwise", None), ("samplewise", None), ("samplewise", 2)])
def test_a_killed_fit_resumes_to_the_same_artifact(shard, tmp_path, monkeypatch, mode, pgd_calls):
    options = {**FAST, "mode": mode, "max_rounds": 3, "stop_accuracy": 1.0, "pgd_steps": 3}
    clean = fit_em(shard, **options, bank_dir=tmp_path / "clean-bank")
    assert clean.params["rounds"] == 3
    with monkeypatch.context() as m:
        _interrupt(m, 1, pgd_calls)
        with pytest.raises(KeyboardInterrupt):
            fit_em(shard, **options, cache_dir=tmp_path / "cache", bank_dir=tmp_path / "bank")
    assert json.loads((tmp_path / "cache" / "em" / "checkpoint.json").read_text())["round"] == 1
    rounds = []
    real = minmin.write_checkpoint
    monkeypatch.setattr(minmin, "write_checkpoint", lambda d, state, t: (rounds.append(state["round"]), real(d, state, t)))
    resumed = fit_em(shard, **options, cache_dir=tmp_path / "cache", bank_dir=tmp_path / "bank")
    assert rounds == [2, 3]  # went on after the last completed round
    assert resumed.params == clean.params
    assert not (tmp_path / "cache").exists()  # removed after success (no keep_cache)
    if mode == "classwise":
        assert torch.equal(resumed.tensors["deltas"], clean.tensors["deltas"])
    else:
        assert resumed.bank.digest == clean.bank.digest
        assert all(torch.equal(a, b) for a, b in zip(_levels(resumed), _levels(clean)))


def test_a_fit_is_deterministic_for_a_seed(shard):
    options = {**FAST, "mode": "samplewise", "max_rounds": 2, "pgd_steps": 3}
    a, b, c = fit_em(shard, **options), fit_em(shard, **options), fit_em(shard, **options, seed=1)
    assert a.params["bank"]["digest"] == b.params["bank"]["digest"] != c.params["bank"]["digest"]
    assert a.params["accuracy_history"] == b.params["accuracy_history"]


def test_a_cache_from_other_settings_is_refused(shard, tmp_path):
    cache = tmp_path / "cache"
    fit_em(shard, mode="classwise", max_rounds=1, cache_dir=cache, keep_cache=True, **FAST)
    assert (cache / "store" / "pixels.u8").exists() and (cache / "em" / "checkpoint.json").exists()
    with pytest.raises(UEDatasetsError, match="other settings.*eps"):
        fit_em(shard, mode="classwise", max_rounds=1, cache_dir=cache, eps="4/255", **FAST)
    other = _shard(tmp_path / "other" / "s.tar", n=12)
    with pytest.raises(UEDatasetsError, match="another fit.*source"):
        fit_em(other, mode="classwise", max_rounds=1, cache_dir=cache, **FAST)
    em.remove_cache(cache)
    assert not cache.exists()


def test_labels_must_be_class_ids(tmp_path):
    bad = _shard(tmp_path / "in" / "bad.tar", n=6, labels=[0, 1, 2, 0, 7, 1])
    with pytest.raises(SampleError, match="k0004.*not a class id"):
        fit_em(bad, mode="classwise", max_rounds=1, num_classes=3, **FAST)
    p = fit_em(bad, mode="classwise", max_rounds=1, **FAST)
    assert p.params["num_classes"] == 8 and tuple(p.tensors["deltas"].shape) == (8, 1, 12, 12)
    with pytest.raises(UEDatasetsError, match="sample-wise"):
        fit_em(bad, mode="samplewise", resolution=8, **FAST)


def test_the_sample_store_resumes_a_killed_pass_without_decoding_again(shard, tmp_path, monkeypatch):
    from ue_datasets.fit import store as store_module

    clean = store_module.build_store(shard, tmp_path / "clean", part_size=8, batch_size=4, progress=False)
    decoded, killed, real = [], [], store_module.colour_image

    def dying(record):  # runs in the decoding threads: no order is assumed
        decoded.append(record.key)
        if record.key == "k0020" and not killed:
            killed.append(True)
            raise KeyboardInterrupt("killed")
        return real(record)

    monkeypatch.setattr(store_module, "colour_image", dying)
    with pytest.raises(KeyboardInterrupt):
        store_module.build_store(shard, tmp_path / "s", part_size=8, batch_size=4, progress=False)
    assert len(list((tmp_path / "s").glob("part-*.safetensors"))) == 2
    decoded.clear()
    again = store_module.build_store(shard, tmp_path / "s", part_size=8, batch_size=4, progress=False)
    assert sorted(decoded) == [f"k{i:04d}" for i in range(16, 48)]  # the two complete parts are not decoded
    assert again.keys == clean.keys and torch.equal(again.checksums, clean.checksums)
    assert torch.equal(again.labels, clean.labels) and again.num_classes == 3
    assert (tmp_path / "s" / "pixels.u8").read_bytes() == (tmp_path / "clean" / "pixels.u8").read_bytes()
    idx = torch.tensor([3, 4, 5])
    assert torch.equal(again.images(idx), clean.images(idx)) and tuple(again.images(idx).shape) == (3, 1, 12, 12)
