"""SALM (a reconstruction): sample-wise error-minimising noise restricted to each image's mask."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch
from conftest import encode, write_shard
from PIL import Image

from ue_datasets.audit.models import build_model
from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit import minmin
from ue_datasets.fit.salm import SaliencyMask, fit_salm, top_mask
from ue_datasets.kernels.samples import pixel_checksum

RATIO = 0.1
FAST = {"surrogate": "small-cnn", "device": "cpu", "batch_size": 16, "train_steps": 3, "pgd_steps": 4,
        "step_size": "2/255", "max_rounds": 2, "stop_accuracy": 1.0, "mask_ratio": RATIO, "progress": False}


def _arrays(n: int = 24, seed: int = 0) -> list[np.ndarray]:
    """Dark-background 'scans': a bright blob on noise, 12 x 12 and 10 x 14 (one channel)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = [(12, 12), (10, 14)][i % 2]
        arr = rng.integers(0, 30, (h, w))
        r, c = rng.integers(2, h - 4), rng.integers(2, w - 4)
        arr[r:r + 3, c:c + 3] += 180 + 10 * (i % 3)
        out.append(arr.astype(np.uint8))
    return out


@pytest.fixture(autouse=True)
def _temporary_dirs_in_tmp_path(tmp_path, monkeypatch):
    """Default caches and noise banks (temporary directories; banks are kept) go under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("salm")
    arrays = _arrays()
    samples = [{"__key__": f"m{i:03d}", "png": encode(Image.fromarray(a, "L")), "cls": str(i % 3).encode()}
               for i, a in enumerate(arrays)]
    return {"shard": write_shard(str(d / "s-000.tar"), samples), "arrays": arrays}


def _support(levels: torch.Tensor) -> torch.Tensor:
    """bool ``(H, W)``: pixel positions where any channel carries noise."""
    return (levels != 0).any(0)


def _entries(protection) -> list[torch.Tensor]:
    return protection.bank.levels(torch.arange(protection.bank.entries))


@pytest.mark.parametrize("refresh", ["once", "round"])
@pytest.mark.parametrize("criterion", ["gradient", "intensity", "random"])
def test_noise_stays_within_each_images_mask(data, criterion, refresh):
    p = fit_salm(data["shard"], mask_criterion=criterion, mask_refresh=refresh, **FAST)
    assert p.method == "salm" and p.params["lookup"] == "key" and p.params["mode"] == "samplewise"
    assert (p.params["mask_ratio"], p.params["mask_criterion"], p.params["mask_refresh"]) == (RATIO, criterion, refresh)
    entries = _entries(p)
    assert len(entries) == len(data["arrays"])
    for levels in entries:
        h, w = levels.shape[-2:]
        assert 0 < int(_support(levels).sum()) <= max(1, math.floor(RATIO * h * w))
        assert int(levels.abs().max()) <= math.floor(255 * 8 / 255 + 0.5)


def test_intensity_masks_pick_the_brightest_pixels(data):
    p = fit_salm(data["shard"], mask_criterion="intensity", **FAST)
    rows = p.bank.find([f"m{i:03d}" for i in range(len(data["arrays"]))],
                       torch.cat([pixel_checksum(torch.from_numpy(a)[None, None]) for a in data["arrays"]]))
    for arr, levels in zip(data["arrays"], p.bank.levels(rows)):
        k = max(1, math.floor(RATIO * arr.size))
        threshold = np.sort(arr.reshape(-1))[::-1][k - 1]
        assert bool((torch.from_numpy(arr)[_support(levels)] >= int(threshold)).all())
    x = torch.tensor([[5, 9, 9], [1, 9, 0]], dtype=torch.float32).reshape(1, 1, 2, 3) / 255
    mask = SaliencyMask(0.5, "intensity", "once", 0)(None, x, torch.zeros(1, dtype=torch.int64), ["a"], 0)
    assert mask.reshape(-1).tolist() == [0, 1, 1, 0, 1, 0]  # the three 9s; ties by index


def test_masks_are_deterministic_and_ties_go_to_the_lower_index():
    scores = torch.tensor([[[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]]])
    assert top_mask(scores, 2).reshape(-1).tolist() == [0, 1, 1, 0, 0, 0]
    x = torch.rand(2, 1, 6, 6)
    a = SaliencyMask(0.25, "random", "round", 7)(None, x, None, ["p", "q"], 1)
    assert torch.equal(a, SaliencyMask(0.25, "random", "round", 7)(None, x, None, ["p", "q"], 1))
    assert not torch.equal(a, SaliencyMask(0.25, "random", "round", 7)(None, x, None, ["p", "q"], 2))
    assert not torch.equal(a[0], a[1]) and int(a.sum()) == 2 * 9
    torch.manual_seed(0)
    model = build_model("small-cnn", 3, 1, 6).train()
    g = SaliencyMask(0.25, "gradient", "once", 0)(model, x, torch.tensor([0, 1]), ["p", "q"], 0)
    assert int(g.sum()) == 2 * 9 and model.training and all(p.grad is None for p in model.parameters())


def test_a_killed_salm_fit_resumes_with_its_stored_mask(data, tmp_path, monkeypatch):
    options = {**FAST, "max_rounds": 3, "mask_criterion": "gradient", "mask_refresh": "once"}
    clean = fit_salm(data["shard"], **options)
    real = minmin.write_checkpoint

    def die_after_round_one(directory, state, tensors):
        real(directory, state, tensors)
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(minmin, "write_checkpoint", die_after_round_one)
        with pytest.raises(KeyboardInterrupt):
            fit_salm(data["shard"], **options, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "salm" / "mask.u8").exists()
    computed = []
    real_scores = SaliencyMask.scores
    monkeypatch.setattr(SaliencyMask, "scores", lambda self, *a: (computed.append(1), real_scores(self, *a))[1])
    resumed = fit_salm(data["shard"], **options, cache_dir=tmp_path / "cache")
    assert resumed.params == clean.params and resumed.bank.digest == clean.bank.digest
    assert not computed  # rounds 2 and 3 read the masks of round 1 back
    with pytest.raises(UEDatasetsError, match="mask_ratio"):
        fit_salm(data["shard"], **{**options, "mask_ratio": 0})
    with pytest.raises(UEDatasetsError, match="mode"):
        fit_salm(data["shard"], mode="classwise")
