"""K-means in torch for Unlearnable Clusters (UC): cluster surrogate features into K groups.

The UC reference code clusters all training features with sklearn's ``KMeans(n_clusters=10)``
(greedy k-means++ seeding, Lloyd's algorithm, ``tol=1e-4`` relative to the mean feature variance,
``max_iter=300``). `kmeans` follows that recipe on any torch device so that ImageNet-sized feature sets
cluster on a GPU; `minibatch_kmeans` (Sculley, WWW 2010) streams feature sets larger than memory.

Distances use ``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2`` on data shifted by a reference point (the
centers' mean, or the first k-means++ center) to limit cancellation, like sklearn. Random draws come
from a CPU `torch.Generator`, so a seed gives bit-identical results on CPU and the same draws on GPU.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import UEDatasetsError
from ..kernels.nearest import DEFAULT_BATCH_SIZE, Assigner, check_int, check_points, chunks, nearest_center


@dataclass
class KMeansResult:
    """The outcome of a k-means fit.

    Attributes:
        centers: float32 ``(K, D)`` cluster centers, on CPU.
        assignments: int64 ``(N,)`` on CPU, the index of each point's nearest final center; always
            recomputed against ``centers``, so it equals ``nearest_center(x, centers)``.
        inertia: sum over points of the squared distance to the assigned center.
        iterations: Lloyd iterations run (`kmeans`) or passes over the stream (`minibatch_kmeans`).
    """

    centers: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    iterations: int


# ----------------------------------------------------------------------------------------- validation


def _check_enough(n: int, k: int) -> None:
    if n < k:
        raise UEDatasetsError(f"k-means needs at least k points: got N={n} points for k={k} clusters")


def _first_nonfinite_row(x: torch.Tensor, batch_size: int) -> int | None:
    """Index of the first row of ``x`` holding a NaN or infinity, or None."""
    if not x.is_floating_point():
        return None
    for start in range(0, x.shape[0], batch_size):
        bad = ~torch.isfinite(x[start:start + batch_size]).all(dim=1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
    return None


def _raise_nonfinite(row: int, where: str = "x") -> None:
    raise UEDatasetsError(f"k-means input {where} holds NaN or infinite values (first at row {row})")


# ------------------------------------------------------------------------------------------ distances


def _sq_dist64(xb: torch.Tensor, cs: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """float64 ``(b, L)`` squared distances of rows ``xb`` to ``cs`` (both shifted by ``shift``), >= 0."""
    xs = xb.to(torch.float64) - shift
    cs = cs.to(torch.float64) - shift
    d = torch.addmm(cs.pow(2).sum(dim=1), xs, cs.t(), alpha=-2.0)
    return d.add_(xs.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)


def _exact_sq_dist(xb: torch.Tensor, assigned_centers: torch.Tensor) -> torch.Tensor:
    """float64 ``(b,)`` exact squared distances of rows ``xb`` to their (gathered) centers ``(b, D)``."""
    return (xb.to(torch.float64) - assigned_centers.to(torch.float64)).pow(2).sum(dim=1)


def _inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for a, b in chunks(x.shape[0], batch_size):
        total += _exact_sq_dist(x[a:b], centers[labels[a:b]]).sum()
    return float(total)


# -------------------------------------------------------------------------------------------- seeding


def _kmeans_plusplus_indices(x: torch.Tensor, k: int, generator: torch.Generator, batch_size: int) -> torch.Tensor:
    """Greedy k-means++ on ``x`` (float ``(N, D)``): int64 ``(k,)`` row indices on CPU."""
    n = x.shape[0]
    n_local_trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    shift = x[first].to(torch.float64)  # a data point: distances are computed relative to it

    def dist_to(rows: torch.Tensor) -> torch.Tensor:  # float64 (N, len(rows)), built chunk by chunk
        cs = x[rows]
        return torch.cat([_sq_dist64(x[a:b], cs, shift) for a, b in chunks(n, batch_size)])

    chosen = [first]
    closest = dist_to(torch.tensor([first], device=x.device))[:, 0]
    closest[first] = 0.0
    for _ in range(1, k):
        cumulative = torch.cumsum(closest, dim=0)
        draws = torch.rand(n_local_trials, generator=generator, dtype=torch.float64, device=generator.device)
        # side="right": a point at distance 0 (an already chosen center) is never drawn
        candidates = torch.searchsorted(cumulative, draws.to(x.device) * cumulative[-1], right=True)
        candidates = candidates.clamp_max_(n - 1)
        cs = x[candidates]
        potentials = torch.zeros(n_local_trials, dtype=torch.float64, device=x.device)
        for a, b in chunks(n, batch_size):
            potentials += torch.minimum(_sq_dist64(x[a:b], cs, shift), closest[a:b, None]).sum(dim=0)
        best = int(candidates[int(potentials.argmin())])
        chosen.append(best)
        closest = torch.minimum(closest, dist_to(torch.tensor([best], device=x.device))[:, 0])
        closest[best] = 0.0
    return torch.tensor(chosen, dtype=torch.int64)


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, as in sklearn).

    The first center is a uniformly drawn point; each next one is the best, by resulting potential
    (sum of squared distances to the nearest center), of ``2 + int(log(k))`` points drawn with
    probability proportional to their squared distance to the nearest chosen center.

    Args:
        x: float ``(N, D)`` points, ``N >= k``, on any device; distances are computed there (float64).
        k: number of centers.
        generator: source of the random draws (draws happen on its device, usually CPU).
        batch_size: rows per chunk; memory is ``O(N + batch_size * log k)``.

    Returns:
        float32 ``(k, D)``, rows of ``x`` (distinct rows unless ``x`` has fewer than ``k`` distinct
        points), on ``x``'s device.
    """
    x = check_points(x)
    k = check_int("k", k, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    _check_enough(x.shape[0], k)
    row = _first_nonfinite_row(x, batch_size)
    if row is not None:
        _raise_nonfinite(row)
    indices = _kmeans_plusplus_indices(x, k, generator, batch_size)
    return x[indices.to(x.device)].to(torch.float32)


# --------------------------------------------------------------------------------------------- Lloyd


def _mean_variance(x: torch.Tensor, batch_size: int) -> float:
    """Mean over features of the (population) variance of ``x``; raises on NaN or infinity."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for a, b in chunks(n, batch_size):
        total += x[a:b].to(torch.float64).sum(dim=0)
    if not bool(torch.isfinite(total).all()):  # finite float32 values cannot overflow a float64 sum
        _raise_nonfinite(_first_nonfinite_row(x, batch_size) or 0)
    mean = total / n
    squares = torch.zeros_like(total)
    for a, b in chunks(n, batch_size):
        squares += (x[a:b].to(torch.float64) - mean).pow(2).sum(dim=0)
    return float((squares / n).mean())


def _lloyd(
    x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float, batch_size: int, bar
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations from float32 ``centers`` ``(K, D)``; returns the final centers and iterations run."""
    k, d = centers.shape
    n = x.shape[0]
    previous = None
    iteration = 0
    for iteration in range(1, max_iter + 1):
        assign = Assigner(centers)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        labels = torch.empty(n, dtype=torch.int64, device=x.device)
        for a, b in chunks(n, batch_size):
            xb = x[a:b]
            labels[a:b] = assign(xb)
            sums.index_add_(0, labels[a:b], xb.to(torch.float64))
        counts = torch.bincount(labels, minlength=k)
        new = (sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64)).to(torch.float32)
        empty = (counts == 0).nonzero()[:, 0]
        if empty.numel():
            # re-seed each empty cluster at one of the points farthest from their current center
            far = torch.cat([_exact_sq_dist(x[a:b], centers[labels[a:b]]) for a, b in chunks(n, batch_size)])
            order = torch.sort(far, descending=True, stable=True).indices[: empty.numel()]
            new[empty] = x[order].to(torch.float32)
        shift = float((new.to(torch.float64) - centers.to(torch.float64)).pow(2).sum())
        centers = new
        bar.update(1)
        bar.set_postfix(shift=f"{shift:.3g}")
        if previous is not None and torch.equal(labels, previous):
            break  # strict convergence: the next assignment would be the same
        if shift <= tol:
            break
        previous = labels
    return centers, iteration


def kmeans(
    x: torch.Tensor,
    k: int = 10,
    *,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Cluster ``x`` into ``k`` groups: greedy k-means++ seeding, then Lloyd's algorithm (like sklearn).

    Args:
        x: float ``(N, D)`` features (cast to float32), ``N >= k``, finite.
        k: number of clusters (UC: 10 whatever the class count).
        seed: seeds a CPU `torch.Generator` that makes every random draw.
        max_iter: Lloyd iterations per run at most.
        tol: stop when the summed squared center shift is ``<= tol * mean(var(x, dim=0))``; the loop
            also stops as soon as the assignments no longer change.
        n_init: independent seedings run one after the other; the lowest inertia wins (first on ties).
        batch_size: rows per chunk for distances; memory is ``O(N + batch_size * (K + D))`` beyond ``x``.
        device: where to compute (default: ``x``'s device); ``x`` is copied there once.
        progress: show progress over iterations.

    Returns:
        A `KMeansResult` on CPU. Empty clusters are re-seeded at the points farthest from their center.
    """
    x = check_points(x)
    k = check_int("k", k, 1)
    seed = check_int("seed", seed, 0)
    max_iter = check_int("max_iter", max_iter, 1)
    n_init = check_int("n_init", n_init, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise UEDatasetsError(f"tol must be a number >= 0, got {tol!r}")
    _check_enough(x.shape[0], k)
    if x.shape[1] < 1:
        raise UEDatasetsError("x must have at least one feature (D >= 1)")
    device = x.device if device is None else torch.device(device)
    x = x.to(device=device, dtype=torch.float32)
    tol_abs = float(tol) * _mean_variance(x, batch_size)  # also rejects NaN and infinity

    from ..progress import progress_bar

    generator = torch.Generator(device="cpu").manual_seed(seed)
    best: KMeansResult | None = None
    for run in range(n_init):
        desc = "k-means" if n_init == 1 else f"k-means {run + 1}/{n_init}"
        with progress_bar(total=max_iter, desc=desc, unit="it", disable=not progress) as bar:
            init = x[_kmeans_plusplus_indices(x, k, generator, batch_size).to(device)]
            centers, iterations = _lloyd(x, init, max_iter, tol_abs, batch_size, bar)
        labels = nearest_center(x, centers, batch_size)
        inertia = _inertia(x, centers, labels, batch_size)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers.cpu(), labels.cpu(), inertia, iterations)
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------ streaming


def _stream(batches: Callable[[], Iterable[torch.Tensor]], d: int | None, device) -> Iterator[torch.Tensor]:
    """Validated float32 chunks of a fresh pass over ``batches()``, on ``device`` (None: as given)."""
    seen = 0
    for chunk in batches():
        chunk = check_points(chunk, f"batch at row {seen}")
        if d is not None and chunk.shape[1] != d:
            raise UEDatasetsError(f"batch at row {seen} has {chunk.shape[1]} features, expected {d}")
        if chunk.shape[0] == 0:
            continue
        row = _first_nonfinite_row(chunk, chunk.shape[0])
        if row is not None:
            _raise_nonfinite(seen + row, "batches()")
        seen += chunk.shape[0]
        yield chunk.to(device=device if device is not None else chunk.device, dtype=torch.float32)


def minibatch_kmeans(
    batches: Callable[[], Iterable[torch.Tensor]],
    k: int = 10,
    *,
    seed: int = 0,
    epochs: int = 10,
    init_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Mini-batch k-means (Sculley, WWW 2010) over a stream of feature chunks larger than memory.

    Seeds with greedy k-means++ on the first ``init_size`` points of the stream, then runs ``epochs``
    passes of Sculley's update: each chunk is assigned to the current centers, then every center moves
    to the running mean of all points it has received (learning rate 1/count, applied per chunk in
    closed form). A last pass computes the assignments and inertia against the final centers. Centers
    that never receive a point keep their seed.

    Args:
        batches: returns a fresh iterable of float ``(b, D)`` chunks, in the same order on every call.
        k: number of clusters.
        seed: seeds the CPU `torch.Generator` of the k-means++ draws.
        epochs: passes of mini-batch updates.
        init_size: points used for seeding (default ``max(3 * k, 10_000)``, at least ``k``; all if fewer).
        device: where to compute (default: the first chunk's device).
        progress: show progress over passes.

    Returns:
        A `KMeansResult` on CPU; ``iterations`` is the number of update passes (``epochs``).
    """
    if not callable(batches):
        raise UEDatasetsError("batches must be a callable returning a fresh iterable of (b, D) tensors")
    k = check_int("k", k, 1)
    seed = check_int("seed", seed, 0)
    epochs = check_int("epochs", epochs, 0)
    init_size = max(3 * k, 10_000) if init_size is None else check_int("init_size", init_size, 1)
    init_size = max(init_size, k)

    sample: list[torch.Tensor] = []
    collected = 0
    for chunk in _stream(batches, None, None if device is None else torch.device(device)):
        if device is None:
            device = chunk.device
        if sample and chunk.shape[1] != sample[0].shape[1]:
            raise UEDatasetsError(f"batch at row {collected} has {chunk.shape[1]} features, "
                                  f"expected {sample[0].shape[1]}")
        sample.append(chunk[: init_size - collected])
        collected += sample[-1].shape[0]
        if collected >= init_size:
            break
    _check_enough(collected, k)
    device = torch.device(device)
    d = sample[0].shape[1]
    if d < 1:
        raise UEDatasetsError("batches must have at least one feature (D >= 1)")
    head = torch.cat(sample)
    del sample
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centers = head[_kmeans_plusplus_indices(head, k, generator, DEFAULT_BATCH_SIZE).to(device)].to(torch.float64)
    del head

    from ..progress import progress_bar

    counts = torch.zeros(k, dtype=torch.int64, device=device)
    n_points = None
    with progress_bar(total=epochs + 1, desc="mini-batch k-means", unit="pass", disable=not progress) as bar:
        for _ in range(epochs):
            seen = 0
            for chunk in _stream(batches, d, device):
                labels = Assigner(centers.to(torch.float32))(chunk)
                sums = torch.zeros(k, d, dtype=torch.float64, device=device)
                sums.index_add_(0, labels, chunk.to(torch.float64))
                batch_counts = torch.bincount(labels, minlength=k)
                updated = counts + batch_counts
                hit = batch_counts > 0
                centers[hit] = (centers[hit] * counts[hit, None] + sums[hit]) / updated[hit, None]
                counts = updated
                seen += chunk.shape[0]
            n_points = _check_same_length(n_points, seen)
            bar.update(1)
        final = centers.to(torch.float32)
        assign = Assigner(final)
        labels_all: list[torch.Tensor] = []
        inertia = torch.zeros((), dtype=torch.float64, device=device)
        for chunk in _stream(batches, d, device):
            labels = assign(chunk)
            labels_all.append(labels.cpu())
            inertia += _exact_sq_dist(chunk, final[labels]).sum()
        _check_same_length(n_points, sum(len(lab) for lab in labels_all))
        bar.update(1)
    return KMeansResult(final.cpu(), torch.cat(labels_all), float(inertia), epochs)


def _check_same_length(expected: int | None, seen: int) -> int:
    if expected is not None and seen != expected:
        raise UEDatasetsError(f"batches() yielded {seen} points on one pass and {expected} on another; "
                              "it must return the same stream on every call")
    return seen
