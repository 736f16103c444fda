"""What an Unlearnable Clusters fit costs: `estimate_cost`, and the timer and messages `fit_clusters` uses.

The perturbation stage dominates: K x epochs passes over the images in faithful mode (one generator
per cluster, each trained on every image), epochs passes in fast mode. `fit_clusters` prints the plan
before the features stage and, once a few steps are timed, how long the stage will take, with advice
when that is over `SLOW_SECONDS`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UEDatasetsError
from ..progress import duration

MODES = ("fast", "faithful", "blocks", "filters")
#: A perturbation stage estimated to take longer than this (seconds) gets advice on how to make it cheaper.
SLOW_SECONDS = 600.0
#: Optimisation steps timed, after one warm-up step, before the duration of the stage is estimated.
TIMED_STEPS = 3


@dataclass(frozen=True)
class CostEstimate:
    """What the perturbation stage of a fit costs (`estimate_cost`).

    Attributes:
        mode, clusters, epochs, cluster_data, batch_size: the fit's settings.
        images: N, the images fitted on; None when not known yet (shards are counted by the features stage).
        passes: passes over the N images: K x epochs in faithful mode with ``cluster_data="all"`` (K
            generators, each trained on every image), else epochs.
        steps: optimisation steps (batches) still to run; None when N is unknown.
        seconds: estimated duration of those steps; None until some were timed.
    """

    mode: str
    clusters: int
    epochs: int
    cluster_data: str
    batch_size: int
    images: int | None
    passes: int
    steps: int | None
    seconds: float | None

    @property
    def slow(self) -> bool:
        """Whether the stage is estimated to take more than `SLOW_SECONDS`."""
        return self.seconds is not None and self.seconds > SLOW_SECONDS

    def line(self) -> str:
        """One line: ``faithful mode: 10 clusters x 50 epochs = 500 passes over 2000 images (...)``."""
        per_cluster = self.mode == "faithful" and self.cluster_data == "all"
        passes = f"{self.clusters} clusters x {self.epochs} epochs" if per_cluster else f"{self.epochs} epochs"
        text = f"{self.mode} mode: {passes} = {self.passes} passes over "
        if self.images is None:
            text += "the images (counted by the features stage)"
        else:
            text += f"{self.images} images ({self.steps} steps of {self.batch_size} to run)"
        if self.seconds is not None:
            text += f", about {duration(self.seconds)} on this device"
        return text

    def advice(self) -> str:
        """How to make a slow fit cheaper; empty when it is not `slow`."""
        if not self.slow:
            return ""
        tips = []
        if self.mode == "faithful" and self.cluster_data == "all":
            fast = duration(self.seconds / self.clusters)
            tips.append(f"--mode fast ({self.clusters} times fewer passes, about {fast})")
        if self.images:
            n = max(self.clusters, int(self.images * SLOW_SECONDS / self.seconds))
            if n < self.images:
                tips.append(f"--limit {n} (fits on the first {n} images, about {duration(SLOW_SECONDS)})")
        epochs = max(1, int(self.epochs * SLOW_SECONDS / self.seconds))
        if epochs < self.epochs:
            tips.append(f"--epochs {epochs} (fewer passes, about {duration(self.seconds * epochs / self.epochs)})")
        return "this fit is long; to make it cheaper: " + "; ".join(tips)


def estimate_cost(*, mode: str, clusters: int, epochs: int, images: int | None, batch_size: int = 256,
                  cluster_data: str = "all", steps: int | None = None,
                  seconds_per_step: float | None = None) -> CostEstimate:
    """Estimate the perturbation stage of a fit: passes, steps and (given a timed step) seconds.

    Args:
        images: N, or None when not known yet.
        steps: optimisation steps still to run, when known exactly (a resumed fit, per-cluster
            member counts); default: all of them, from N (per cluster in faithful mode).
        seconds_per_step: measured duration of one step; gives ``seconds = steps * seconds_per_step``.
    """
    if mode not in MODES:
        raise UEDatasetsError(f"mode must be one of {MODES}, got {mode!r}")
    per_cluster = mode == "faithful" and cluster_data == "all"
    passes = clusters * epochs if per_cluster else epochs
    if steps is None and images is not None:
        batches = math.ceil(images / batch_size)
        if mode == "faithful" and cluster_data == "members":  # K smaller sets, each rounded up
            batches += clusters - 1
        steps = epochs * batches * (clusters if per_cluster else 1)
    seconds = steps * seconds_per_step if steps is not None and seconds_per_step is not None else None
    return CostEstimate(mode, clusters, epochs, cluster_data, batch_size, images, passes, steps, seconds)


def say(text: str) -> None:
    print(f"ue-datasets: clusters: {text}", file=sys.stderr, flush=True)


class StepTimer:
    """Times optimisation steps: after one warm-up step and `TIMED_STEPS` more, calls ``report(seconds per
    step, steps still to run)`` once. ``begin`` tells it how many steps the stage runs."""

    def __init__(self, report: Callable[[float, int], None]):
        self.report, self.left, self.count, self.start = report, 0, 0, 0.0

    def begin(self, steps: int) -> None:
        self.left = steps

    def tick(self) -> None:
        self.left -= 1
        self.count += 1
        if self.count == 1:
            self.start = time.perf_counter()
        elif self.count == 1 + TIMED_STEPS:
            self.report((time.perf_counter() - self.start) / TIMED_STEPS, self.left)


def source_size(src: str) -> int | None:
    """Samples in ``src`` when its metadata tells (parquet, ``save_to_disk``) without decoding; else None."""
    from ..apply.sources import resolve

    try:
        source = resolve(src)
        if source.kind == "parquet":
            import fsspec
            import pyarrow.parquet as pq

            total = 0
            for url in source.urls:
                with fsspec.open(url, "rb") as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            return total
        if source.kind == "hf":
            import datasets

            ds = datasets.load_from_disk(source.urls[0])
            return sum(ds.num_rows.values()) if isinstance(ds, datasets.DatasetDict) else ds.num_rows
    except Exception:  # noqa: BLE001 - the size is only for the estimate; the features stage reports errors
        return None
    return None
