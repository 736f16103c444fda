"""K-means for Unlearnable Clusters: seeding, Lloyd, mini-batch streaming, validation and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit import kmeans as kmeans_module
from ue_datasets.fit.kmeans import (
    KMeansResult,
    kmeans,
    kmeans_plusplus,
    minibatch_kmeans,
    nearest_center,
)

BLOBS, PER_BLOB, DIM = 5, 200, 16


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(1000, 16)`` points of 5 well separated unit-variance Gaussian blobs (shuffled), and labels."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(BLOBS, DIM, generator=g) * 10
    labels = torch.arange(BLOBS).repeat_interleave(PER_BLOB)
    x = means[labels] + torch.randn(BLOBS * PER_BLOB, DIM, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return x[order], labels[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when labelings ``a`` and ``b`` are equal up to a permutation of the labels."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = torch.zeros(ka, kb, dtype=torch.int64)
    table.index_put_((a, b), torch.ones_like(a), accumulate=True)
    nonzero = table > 0
    return ka == kb and bool((nonzero.sum(0) == 1).all()) and bool((nonzero.sum(1) == 1).all())


def stream(x: torch.Tensor, size: int = 128):
    return lambda: (x[i:i + size] for i in range(0, len(x), size))


def check_result(result: KMeansResult, x: torch.Tensor, k: int) -> None:
    assert result.centers.shape == (k, x.shape[1]) and result.centers.dtype == torch.float32
    assert result.assignments.shape == (len(x),) and result.assignments.dtype == torch.int64
    assert result.centers.device.type == "cpu" and result.assignments.device.type == "cpu"
    assert torch.equal(result.assignments, nearest_center(x, result.centers))
    inertia = (x.double() - result.centers.double()[result.assignments]).pow(2).sum().item()
    assert result.inertia == pytest.approx(inertia, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_blobs(seed):
    x, truth = blobs()
    result = kmeans(x, BLOBS, seed=seed)
    check_result(result, x, BLOBS)
    assert same_partition(result.assignments, truth)
    assert 1 <= result.iterations < 300


def test_minibatch_recovers_blobs():
    x, truth = blobs()
    result = minibatch_kmeans(stream(x), BLOBS, seed=0, epochs=3)
    check_result(result, x, BLOBS)
    assert same_partition(result.assignments, truth)
    assert result.iterations == 3
    full = kmeans(x, BLOBS, seed=0)
    assert result.inertia == pytest.approx(full.inertia, rel=1e-2)


def test_minibatch_small_init_size():
    x, truth = blobs(1)
    result = minibatch_kmeans(stream(x, 100), BLOBS, seed=0, epochs=2, init_size=300)
    check_result(result, x, BLOBS)
    assert same_partition(result.assignments, truth)


def test_deterministic():
    x, _ = blobs()
    a, b = kmeans(x, 7, seed=3), kmeans(x, 7, seed=3)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    c, d = minibatch_kmeans(stream(x), 7, seed=3, epochs=2), minibatch_kmeans(stream(x), 7, seed=3, epochs=2)
    assert torch.equal(c.centers, d.centers) and torch.equal(c.assignments, d.assignments)
    p = kmeans_plusplus(x, 7, torch.Generator().manual_seed(5))
    assert torch.equal(p, kmeans_plusplus(x, 7, torch.Generator().manual_seed(5)))


def test_n_init_keeps_the_best():
    x, _ = blobs()
    one, three = kmeans(x, 8, seed=0), kmeans(x, 8, seed=0, n_init=3)
    assert three.inertia <= one.inertia  # the first of the three runs is the single run
    check_result(three, x, 8)


def test_kmeans_plusplus_picks_distinct_points():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    centers = kmeans_plusplus(x, 20, torch.Generator().manual_seed(1), batch_size=33)
    assert centers.shape == (20, 6) and centers.dtype == torch.float32
    matches = (centers[:, None, :] == x[None, :, :]).all(dim=2)  # (20, 200)
    assert bool((matches.sum(dim=1) == 1).all())
    assert len(set(matches.float().argmax(dim=1).tolist())) == 20


def test_kmeans_plusplus_one_center_per_blob():
    x, truth = blobs()
    centers = kmeans_plusplus(x, BLOBS, torch.Generator().manual_seed(0))
    rows = (centers[:, None, :] == x[None, :, :]).all(dim=2).float().argmax(dim=1)
    assert sorted(truth[rows].tolist()) == list(range(BLOBS))


def test_nearest_center_chunking_and_ties():
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(1000, 16, generator=g) + 50, torch.randn(7, 16, generator=g) + 50
    whole = nearest_center(x, centers, batch_size=10**6)
    assert whole.dtype == torch.int64 and whole.shape == (1000,)
    assert torch.equal(whole, nearest_center(x, centers, batch_size=37))
    brute = torch.cdist(x.double(), centers.double()).argmin(dim=1)
    assert torch.equal(whole, brute)
    twice = torch.cat([centers, centers])  # every point ties between c and its copy: lowest index wins
    assert torch.equal(nearest_center(x, twice, batch_size=64), whole)
    assert nearest_center(x[:0], centers).shape == (0,)


def test_too_few_points():
    with pytest.raises(UEDatasetsError, match=r"N=3 .*k=5"):
        kmeans(torch.randn(3, 2), 5)
    with pytest.raises(UEDatasetsError, match=r"N=3 .*k=5"):
        kmeans_plusplus(torch.randn(3, 2), 5, torch.Generator())
    with pytest.raises(UEDatasetsError, match=r"N=4 .*k=5"):
        minibatch_kmeans(stream(torch.randn(4, 2), 2), 5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input(bad):
    x = torch.randn(50, 4)
    x[17, 2] = bad
    with pytest.raises(UEDatasetsError, match="NaN or infinite.*row 17"):
        kmeans(x, 3)
    with pytest.raises(UEDatasetsError, match="NaN or infinite.*row 17"):
        minibatch_kmeans(stream(x, 8), 3)


@pytest.mark.parametrize(
    "kwargs", [{"k": 0}, {"k": 2.5}, {"max_iter": 0}, {"n_init": 0}, {"tol": -1.0}, {"batch_size": 0}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(UEDatasetsError):
        kmeans(torch.randn(20, 3), **kwargs)


def test_bad_shapes():
    with pytest.raises(UEDatasetsError, match="2-D"):
        kmeans(torch.randn(20), 2)
    with pytest.raises(UEDatasetsError, match="features"):
        nearest_center(torch.randn(5, 3), torch.randn(2, 4))
    with pytest.raises(UEDatasetsError, match="features"):
        minibatch_kmeans(lambda: iter([torch.randn(4, 3), torch.randn(4, 2)]), 2, epochs=1)


def test_identical_points_leave_empty_clusters():
    x = torch.ones(10, 4)
    result = kmeans(x, 3)
    check_result(result, x, 3)
    assert torch.equal(result.centers, torch.ones(3, 4)) and result.inertia == 0.0
    assert torch.equal(result.assignments, torch.zeros(10, dtype=torch.int64))  # ties: lowest index
    mini = minibatch_kmeans(stream(x, 3), 3, epochs=2)
    check_result(mini, x, 3)


def test_duplicates_and_k_close_to_n():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).repeat(2, 1)  # 6 distinct, 12 rows
    result = kmeans(x, 8)  # more clusters than distinct points
    check_result(result, x, 8)
    assert result.inertia == pytest.approx(0.0, abs=1e-10)
    distinct = torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    exact = kmeans(distinct, 12)
    check_result(exact, distinct, 12)
    assert sorted(exact.assignments.tolist()) == list(range(12)) and exact.inertia == pytest.approx(0.0, abs=1e-10)


def test_empty_clusters_reseeded_at_farthest_points(monkeypatch):
    x, _ = blobs()
    # a degenerate seeding (all five centers on one point) leaves four clusters empty in the first iteration
    monkeypatch.setattr(kmeans_module, "_kmeans_plusplus_indices", lambda x, k, g, b: torch.zeros(k, dtype=torch.int64))
    result = kmeans(x, BLOBS)
    check_result(result, x, BLOBS)
    assert torch.bincount(result.assignments, minlength=BLOBS).min() > 0
    assert torch.equal(result.centers, kmeans(x, BLOBS).centers)  # deterministic


def test_max_iter_and_progress():
    x, _ = blobs()
    result = kmeans(x, BLOBS, max_iter=1, progress=True)
    assert result.iterations == 1
    check_result(result, x, BLOBS)
    check_result(minibatch_kmeans(stream(x), BLOBS, epochs=1, progress=True), x, BLOBS)


def test_minibatch_stream_must_repeat():
    x, _ = blobs()
    calls = []

    def shrinking():
        calls.append(None)
        return iter(x[: len(x) - 10 * len(calls)].split(128))

    with pytest.raises(UEDatasetsError, match="same stream"):
        minibatch_kmeans(shrinking, BLOBS, epochs=2)


def test_float64_and_explicit_device():
    x, truth = blobs()
    result = kmeans(x.double(), BLOBS, device="cpu")
    assert result.centers.dtype == torch.float32
    assert same_partition(result.assignments, truth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, truth = blobs()
    gpu = kmeans(x.cuda(), BLOBS, seed=0)
    assert gpu.centers.device.type == "cpu"
    assert same_partition(gpu.assignments, truth)
    assert torch.equal(gpu.assignments, kmeans(x, BLOBS, seed=0).assignments)
    assert torch.equal(nearest_center(x.cuda(), gpu.centers).cpu(), gpu.assignments)
    mini = minibatch_kmeans(stream(x.cuda()), BLOBS, epochs=2)
    assert same_partition(mini.assignments, truth)


def test_inertia_agrees_with_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    x, _ = blobs()
    ours = kmeans(x, BLOBS, seed=0)
    theirs = cluster.KMeans(n_clusters=BLOBS, n_init=1, random_state=0).fit(x.numpy())
    assert ours.inertia == pytest.approx(float(theirs.inertia_), rel=1e-3)
