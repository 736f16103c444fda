"""Timing and reporting shared by the benchmarks under recipes/: paired, interleaved, medians.

The machines these run on are noisy: `interleaved` runs every contender of a measurement back to back,
in an order that alternates between repeats, after one untimed warm-up round; `ratio` is the median of
the per-repeat (paired) ratios, with the fastest over the fastest as a check on bursts of load.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import PIL
import torch

import ue_datasets


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "ue_datasets": ue_datasets.__version__,
    }


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each contender per repeat; one untimed warm-up round, order alternating per repeat."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(num: list[float], den: list[float]) -> dict:
    """``median``: median of the paired per-repeat ratios; ``best``: fastest over fastest."""
    paired = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(paired), "best": min(num) / min(den), "paired": paired}


def summary(times: list[float], n: int) -> dict:
    med = statistics.median(times)
    return {"seconds": times, "median_s": med, "best_s": min(times), "images_per_s": n / med}


def spread(values: list[float]) -> str:
    return f"[{min(values):.3g}..{max(values):.3g}]"


# --------------------------------------------------------------------------- report


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_times(title: str, s: dict) -> None:
    runs = "..".join(f"{1e3 * t:.4g}" for t in (min(s["seconds"]), max(s["seconds"])))
    print(f"    {title:20s} {1e3 * s['median_s']:10.2f} ms  {s['images_per_s']:9.1f} img/s   "
          f"best {1e3 * s['best_s']:.4g} ms   runs [{runs}] ms")


def print_ratio(title: str, r: dict, target: str = "") -> None:
    print(f"    {title:20s} {r['median']:8.2f}x {target}  best/best {r['best']:.2f}x   paired {spread(r['paired'])}")
