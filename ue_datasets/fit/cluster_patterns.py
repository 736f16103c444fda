"""Key-derived cluster perturbations: the ``blocks`` and ``filters`` modes of Unlearnable Clusters.

Neither needs the surrogate beyond clustering, so both cost one features pass:

* ``blocks`` (ours): per cluster a low-frequency pattern, a ``grid x grid`` board of blocks of
  ``+eps`` or ``-eps`` per channel, resized nearest to R x R (7-pixel blocks on 28-pixel images with
  the default grid of 4). Bounded in L-inf by eps like the reference's deltas, and free of any
  surrogate: with clusters = classes (the audit's oracle) they make as strong a shortcut as the
  reference's optimised deltas on Fashion-MNIST (README, "Evidence"). ``fit_clusters`` can refine them
  with the UC objective (``epochs > 0``).
* ``filters``: per cluster a CUDA filter (Sadasivan et al.), drawn exactly as `fit.convolution.draw_filters`
  from the key: each image is convolved with its cluster's ``k x k`` filter and divided by its maximum.
  **Not bounded in L-inf**, as CUDA is not: the images get visibly blurred.

The key is an integer in ``[0, 2**32)``; the same key, K, channels, R and grid (kernel size and blur)
give the same patterns.
"""

from __future__ import annotations

import hashlib
import secrets

import torch
import torch.nn.functional as F

from ..errors import UEDatasetsError
from .convolution import check_filter_options, check_key, draw_filters

#: Blocks per side of a ``blocks`` pattern.
DEFAULT_GRID = 4
#: Draws per pattern before giving up on K distinct block patterns (only K near 2 ** (C * grid * grid)
#: can need more).
_TRIES = 100


def pattern_key(key: int | None) -> int:
    """``key`` checked (`check_key`), or a fresh secret one when ``None``."""
    return secrets.randbelow(2**32) if key is None else check_key(key)


def check_grid(grid: int, resolution: int) -> None:
    """Refuse a ``blocks`` grid that is not an integer in ``[1, resolution]``."""
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= resolution:
        raise UEDatasetsError(f"grid must be an integer in [1, resolution {resolution}], got {grid!r}")


def block_patterns(clusters: int, channels: int, resolution: int, eps: float, key: int,
                   grid: int = DEFAULT_GRID) -> torch.Tensor:
    """K distinct boards of ``grid x grid`` blocks of ``+-eps`` per channel, derived from ``key``.

    Returns:
        float32 ``(clusters, channels, resolution, resolution)`` with values ``+eps`` or ``-eps``; each
        block covers about ``resolution / grid`` pixels per side (nearest resize).
    """
    check_grid(grid, resolution)
    if clusters > 2 ** min(channels * grid * grid, 62):
        raise UEDatasetsError(f"a {grid} x {grid} grid has too few sign patterns for {clusters} clusters")
    seed = int.from_bytes(hashlib.sha256(f"ue-datasets/clusters/blocks/{key}".encode()).digest()[:8], "big")
    g = torch.Generator().manual_seed(seed)
    signs: list[torch.Tensor] = []
    for _ in range(clusters):
        for _ in range(_TRIES):
            s = torch.randint(0, 2, (channels, grid, grid), generator=g).float().mul_(2).sub_(1)
            if not any(torch.equal(s, t) for t in signs):
                break
        else:
            raise UEDatasetsError(f"could not draw {clusters} distinct {grid} x {grid} block patterns; use a larger grid")
        signs.append(s)
    boards = torch.stack(signs)
    return F.interpolate(boards, size=(resolution, resolution), mode="nearest").mul_(eps).contiguous()


def cluster_filters(clusters: int, key: int, kernel_size: int = 3, blur: float = 0.3) -> torch.Tensor:
    """One CUDA filter per cluster from ``key`` (`draw_filters`): float32 ``(clusters, k, k)``."""
    check_filter_options(kernel_size, blur)
    return torch.from_numpy(draw_filters(clusters, key, kernel_size, blur)).to(torch.float32)
