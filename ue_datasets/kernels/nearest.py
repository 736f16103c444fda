"""Nearest-center search: which of K centers each feature row is closest to.

Used by k-means at fit time (`ue_datasets.fit.kmeans`) and by Unlearnable Clusters at apply time, to
give a new image the cluster of its nearest center (`ue_datasets.apply.clusters`): one function, so
both stages assign alike.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import torch

from ..errors import UEDatasetsError

DEFAULT_BATCH_SIZE = 65536


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UEDatasetsError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UEDatasetsError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_points(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise UEDatasetsError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise UEDatasetsError(f"{name} must be a 2-D (N, D) tensor, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise UEDatasetsError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x


def chunks(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


class Assigner:
    """Nearest-center search against fixed ``centers`` (float32 ``(K, D)``) on one device.

    Scores ``||c - m||^2 - 2 (x - m).(c - m)`` with ``m`` the centers' mean; the argmin takes the lowest
    index on ties. Every row's result depends only on that row, not on the chunking.
    """

    def __init__(self, centers: torch.Tensor):
        centers = centers.to(torch.float32)
        self.shift = centers.mean(dim=0)
        self.shifted_t = (centers - self.shift).t().contiguous()  # (D, K)
        self.norms = self.shifted_t.pow(2).sum(dim=0)  # (K,)

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        """float ``(b, D)`` -> int64 ``(b,)`` on ``xb``'s device."""
        scores = torch.addmm(self.norms, xb.to(torch.float32) - self.shift, self.shifted_t, alpha=-2.0)
        return scores.argmin(dim=1)


def nearest_center(x: torch.Tensor, centers: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Index of the nearest center (squared euclidean distance) of every row of ``x``.

    Args:
        x: float ``(N, D)`` points, on any device; the search runs there.
        centers: float ``(K, D)``, moved to ``x``'s device.
        batch_size: rows per chunk; memory is ``O(batch_size * K)`` beyond the inputs.

    Returns:
        int64 ``(N,)`` on ``x``'s device; ties go to the lowest center index.
    """
    x = check_points(x)
    centers = check_points(centers, "centers")
    batch_size = check_int("batch_size", batch_size, 1)
    if centers.shape[0] < 1:
        raise UEDatasetsError("centers must hold at least one center")
    if centers.shape[1] != x.shape[1]:
        raise UEDatasetsError(f"x has {x.shape[1]} features but centers have {centers.shape[1]}")
    assign = Assigner(centers.to(x.device))
    labels = [assign(x[a:b]) for a, b in chunks(x.shape[0], batch_size)]
    if not labels:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    return torch.cat(labels)
