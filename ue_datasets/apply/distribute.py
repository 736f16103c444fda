"""Distributors: who runs the per-file rewrites of `ue_datasets.apply.shards.run`.

Every distributor has one signature, ``(rewrite, protection, jobs, options, overwrite, progress)``,
where ``jobs`` is a list of ``(index, in_url, out_url)``; it yields ``(index, outcome)`` as files
finish, the outcome being the file's stats or the `OutputBusy` of a file another run is writing:

* `serial`: in this process, one file after another, with a bar of samples;
* `processes`: ``workers`` spawned processes (so CUDA works in them), each rewriting whole files;
* `ue_datasets.apply.ray.ray_tasks`: one Ray task per file on a Ray cluster.

They all call the same ``rewrite``, so the outputs, their names, their stats files and the resume and
locking rules are the same whichever runs them.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import torch

from ..artifact import Protection
from ..errors import UEDatasetsError
from ..progress import progress_bar
from .commit import OutputBusy
from .core import resolve_device

#: ``(index, in_url, out_url)`` of one file to rewrite.
Job = tuple[int, str, str]
#: What a file ends as: its stats, or the lock of another run that is writing it.
Outcome = dict[str, Any] | OutputBusy
Distributor = Callable[..., Iterator[tuple[int, Outcome]]]


def worker_device(device: str, worker: int) -> str:
    """The device of worker number ``worker``: with several GPUs, workers take them in turn."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"
    return device


@contextmanager
def core_threads(device: str) -> Iterator[None]:
    """On CPU, run the tensor core single-threaded while rewriting files.

    The decode/encode pool already keeps every core busy and overlaps with the core; intra-op
    threads on top only oversubscribe the cores (and stall badly on a loaded machine).
    """
    if resolve_device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def serial(rewrite: Callable[..., dict[str, Any]], protection: Protection, jobs: Sequence[Job], options: Any,
           overwrite: bool, progress: bool) -> Iterator[tuple[int, Outcome]]:
    """Rewrite the files in this process, in order."""
    with progress_bar(unit="img", desc="samples", disable=not progress, leave=False) as samples, \
            core_threads(options.device):
        for i, src, dst in jobs:
            try:
                outcome: Outcome = rewrite(protection, src, dst, options, samples.update, overwrite)
            except OutputBusy as e:
                outcome = e
            yield i, outcome


def _die_with_parent() -> None:
    """Pool initializer: on Linux, a worker is killed when the run that spawned it dies, so an orphan
    never goes on holding an output's lock (its partial file is removed by the next run)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def _task(rewrite: Callable[..., dict[str, Any]], protection: Protection, in_url: str, out_url: str, options: Any,
          overwrite: bool, worker: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    options = options.replace(device=worker_device(options.device, worker))
    return rewrite(protection, in_url, out_url, options, None, overwrite)


def processes(workers: int) -> Distributor:
    """A distributor of ``workers`` spawned processes."""

    def distribute(rewrite: Callable[..., dict[str, Any]], protection: Protection, jobs: Sequence[Job], options: Any,
                   overwrite: bool, progress: bool) -> Iterator[tuple[int, Outcome]]:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent) as pool:
            futures = {pool.submit(_task, rewrite, protection, src, dst, options, overwrite, n): i
                       for n, (i, src, dst) in enumerate(jobs)}
            for future in as_completed(futures):
                try:
                    outcome: Outcome = future.result()
                except OutputBusy as e:
                    outcome = e
                except BrokenProcessPool:
                    raise UEDatasetsError(
                        "a worker process died before its file was done (nothing of it was committed; "
                        "rerun to resume). Workers are spawned and import the main script again: in a "
                        "script, call protect under `if __name__ == \"__main__\":`") from None
                yield futures[future], outcome

    return distribute


def distributor_for(engine: Any, workers: int, files: int | None = None) -> Distributor:
    """The distributor of an engine for ``files`` files (``None``: not known yet): ``"local"`` (`serial`,
    or `processes` with ``workers > 1`` and more than one file),
    ``"ray"`` or a `ue_datasets.apply.ray.RayEngine` (fails at once, with the install command, when
    ray is not installed)."""
    if engine == "local":
        return serial if workers <= 1 or (files is not None and files <= 1) else processes(workers)
    from .ray import RayEngine, ray_tasks

    if engine == "ray":
        engine = RayEngine()
    if not isinstance(engine, RayEngine):
        raise UEDatasetsError(f"engine must be 'local', 'ray' or a RayEngine, got {engine!r}")
    if workers > 1:
        raise UEDatasetsError("workers is for the local engine; on Ray every file is a task, scheduled by the "
                              "resources it asks for (RayEngine(cpus_per_task=..., gpus_per_task=...))")
    return ray_tasks(engine)
