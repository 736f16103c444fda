"""Unlearnable Clusters fit cost: the estimate, its advice, and what a fit prints (and when)."""

from __future__ import annotations

import pytest
import torch

from ue_datasets.encoders import callable_encoder
from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit import cost
from ue_datasets.fit.clusters import estimate_cost, fit_clusters

PREFIX = "ue-datasets: clusters:"


def test_faithful_mode_costs_k_times_the_passes_of_fast_mode():
    faithful = estimate_cost(mode="faithful", clusters=10, epochs=50, images=2000, batch_size=256)
    fast = estimate_cost(mode="fast", clusters=10, epochs=50, images=2000, batch_size=256)
    assert (faithful.passes, faithful.steps) == (500, 10 * 50 * 8)
    assert (fast.passes, fast.steps) == (50, 50 * 8)
    members = estimate_cost(mode="faithful", clusters=10, epochs=50, images=2000, cluster_data="members")
    assert members.passes == 50 and members.steps == 50 * (8 + 9)  # each cluster's batches rounded up
    assert faithful.seconds is None and not faithful.slow
    assert "10 clusters x 50 epochs = 500 passes over 2000 images" in faithful.line()


def test_an_unknown_image_count_still_gives_the_passes():
    e = estimate_cost(mode="faithful", clusters=4, epochs=3, images=None)
    assert e.passes == 12 and e.steps is None and "counted by the features stage" in e.line()


def test_a_slow_estimate_advises_fast_mode_a_limit_and_fewer_epochs():
    e = estimate_cost(mode="faithful", clusters=10, epochs=50, images=2000, batch_size=256, seconds_per_step=1.0)
    assert e.seconds == 4000 and e.slow
    assert "about 1 h 07 min" in e.line()
    advice = e.advice()
    assert "--mode fast (10 times fewer passes" in advice
    assert "--limit 300 " in advice  # 2000 images x 600 s / 4000 s
    assert "--epochs 7 " in advice
    fast = estimate_cost(mode="fast", clusters=10, epochs=50, images=2000, seconds_per_step=10.0)
    assert fast.slow and "--mode fast" not in fast.advice()
    quick = estimate_cost(mode="faithful", clusters=10, epochs=1, images=100, seconds_per_step=0.01)
    assert not quick.slow and quick.advice() == ""


def test_a_bad_mode_is_refused():
    with pytest.raises(UEDatasetsError, match="mode"):
        estimate_cost(mode="slow", clusters=2, epochs=1, images=10)


def _fit(src, progress: bool):
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    return fit_clusters(str(src), callable_encoder(net, size=8), clusters=2, mode="fast", epochs=2, batch_size=2,
                        resolution=8, device="cpu", progress=progress)


def _said(err: str) -> list[str]:
    """The fit's own lines in stderr (progress bars may share a line with them)."""
    return [PREFIX + line.split(PREFIX, 1)[1] for line in err.replace("\r", "\n").splitlines() if PREFIX in line]


def test_a_fit_prints_its_plan_then_its_timed_estimate(dataset_dir, monkeypatch, capsys):
    monkeypatch.setattr(cost, "TIMED_STEPS", 1)
    _fit(dataset_dir, progress=True)
    lines = _said(capsys.readouterr().err)
    # the dataset's size is read before the features stage: 2 epochs of 3 batches of 2 images
    assert lines[0] == f"{PREFIX} fast mode: 2 epochs = 2 passes over 6 images (6 steps of 2 to run)"
    assert lines[1].startswith(f"{PREFIX} fast mode: 2 epochs = 2 passes over 6 images (4 steps of 2 to run), about ")
    assert lines[1].endswith(" on this device") and len(lines) == 2  # not slow: no advice


def test_a_quiet_fit_prints_only_the_advice_of_a_slow_one(dataset_dir, monkeypatch, capsys):
    monkeypatch.setattr(cost, "TIMED_STEPS", 1)
    _fit(dataset_dir, progress=False)
    assert PREFIX not in capsys.readouterr().err
    monkeypatch.setattr(cost, "SLOW_SECONDS", 0.0)
    _fit(dataset_dir, progress=False)
    lines = _said(capsys.readouterr().err)
    assert len(lines) == 2 and "about" in lines[0]
    assert lines[1].startswith(f"{PREFIX} this fit is long; to make it cheaper: --limit 2 ")
