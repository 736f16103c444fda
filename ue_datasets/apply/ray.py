"""Ray: the shard rewriter's engine for clusters (`RayEngine`, `ray_tasks`) and a Ray Data adapter
(`ProtectBatches`). Optional: ``pip install "ue-datasets[ray]"``; ray is imported only when used.

`ProtectBatches` is a callable class for ``Dataset.map_batches``: each actor loads the protection once,
and every batch goes through the same row body as the ``datasets.map`` function
(`ue_datasets.apply.rows.protect_rows`), so the pixels are those of every other adapter:

>>> import ray
>>> ds = ray.data.read_webdataset("shards/", decoder=None)  # raw bytes (decoder=False still decodes)  # doctest: +SKIP
>>> protected = ds.map_batches(ProtectBatches, fn_constructor_kwargs={"protection": "artifact/"}, batch_size=256,
...                            compute=ray.data.ActorPoolStrategy(size=1))  # doctest: +SKIP
>>> protected.write_webdataset("protected/", encoder=None)  # keep the bytes: no re-encoding  # doctest: +SKIP

The engine runs the per-file rewrite of the local engine as one Ray task per input file, so the
outputs, their names, their stats files, and the resume and locking rules are the local engine's:

>>> from ue_datasets import protect
>>> engine = RayEngine(address="auto", gpus_per_task=0.25)
>>> protect("shards/", "protected/", "artifact/", engine=engine)  # doctest: +SKIP

``ue-datasets protect ... --engine ray [--ray-address auto|HOST:PORT] [--gpus-per-task F]`` is the same.
A task that fails for a reason other than its data (its worker crashed, an unexpected exception) is
tried again up to ``max_retries`` times; the files whose tasks still fail are reported together, by
file, once every other file is done (and committed: a rerun resumes). An error in the data (a bad
sample, an unreadable file) would fail again and is reported at once.

Every worker imports ue_datasets: on a cluster, install it on every node (or ship it with a Ray
``runtime_env``), and give paths every node can read (a shared filesystem or fsspec URLs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..artifact import Protection, as_protection
from ..errors import UEDatasetsError
from .commit import OutputBusy
from .core import UNFITTED, needs_keys
from .distribute import Job, Outcome
from .encoded import ON_ERROR, field_names
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, PNG_LEVEL, OutputFormat
from .rows import RowOptions, protect_rows
from .texts import TextSource
from .wds import label_of

INSTALL = 'pip install "ue-datasets[ray]"'


def require_ray() -> Any:
    """The ``ray`` module, or a `UEDatasetsError` with the install command."""
    try:
        import ray
    except ImportError:
        raise UEDatasetsError(f"the Ray engine needs ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayEngine:
    """Where and how the files' tasks run.

    Attributes:
        address: the cluster to join (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:PORT"``); ``None``:
            the cluster this process is connected to, or else a local one started for the run and
            shut down after it.
        gpus_per_task: GPUs each task holds (fractions share a GPU); with 0, ``device="auto"`` runs
            the task on CPU.
        cpus_per_task: CPUs each task holds; its tensor core runs that many threads.
        max_retries: further tries of a task that failed for a reason other than its data.
    """

    address: str | None = None
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.gpus_per_task < 0 or self.cpus_per_task <= 0:
            raise UEDatasetsError(f"gpus_per_task must be >= 0 and cpus_per_task > 0, got {self.gpus_per_task} "
                                  f"and {self.cpus_per_task}")
        if self.max_retries < 0:
            raise UEDatasetsError(f"max_retries must be >= 0, got {self.max_retries}")


class RayTasksFailed(UEDatasetsError):
    """Files whose Ray tasks failed, after their retries; every other file was written.

    Attributes:
        failures: ``{input file: error}``.
    """

    def __init__(self, failures: dict[str, str], total: int):
        self.failures = dict(failures)
        lines = "\n".join(f"  {name}: {error}" for name, error in self.failures.items())
        super().__init__(f"{len(failures)} of {total} file(s) failed on Ray (the others are written; rerun to "
                         f"resume):\n{lines}")

    def __reduce__(self):
        return (_rebuild_failed, (self.failures, str(self)))


def _rebuild_failed(failures: dict[str, str], message: str) -> RayTasksFailed:
    error = RayTasksFailed.__new__(RayTasksFailed)
    error.failures = failures
    UEDatasetsError.__init__(error, message)
    return error


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected: to the cluster already joined, else to ``address`` (or a new local
    cluster), which is then left when the block ends."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def _file_task(rewrite: Callable[..., dict[str, Any]], protection: Protection, in_url: str, out_url: str,
               options: Any, overwrite: bool, threads: int, gpus: float) -> dict[str, Any]:
    """One file's rewrite in a Ray worker, as `ue_datasets.apply.distribute.serial` does it here."""
    torch.set_num_threads(threads)
    if options.device == "auto" and gpus == 0:
        options = options.replace(device="cpu")  # hold no GPU it did not ask for
    return rewrite(protection, in_url, out_url, options, None, overwrite)


def _cause(error: Exception) -> Exception:
    """The exception a task raised, from the Ray error that carries it."""
    return getattr(error, "cause", None) or error


def _describe(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def each_task(ray: Any, remote: Any, calls: dict[int, tuple], names: dict[int, str],
              engine: RayEngine) -> Iterator[tuple[int, Any]]:
    """Run ``remote.remote(*calls[i])`` for every ``i``; yield ``(i, result)`` as tasks finish.

    An `OutputBusy` a task raised is yielded as its result; another `UEDatasetsError` (the data's: it
    would fail again) is raised at once; any other exception is retried up to ``engine.max_retries``
    times (Ray itself retries crashed workers as often). Then `RayTasksFailed` names, by ``names[i]``,
    every task that still failed. Tasks still running when the caller stops are cancelled.
    """
    tries = dict.fromkeys(calls, 0)

    def submit(i: int) -> Any:
        tries[i] += 1
        return remote.remote(*calls[i])

    running = {submit(i): i for i in calls}
    failures: dict[int, str] = {}
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            i = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a Ray error around the task's own
                cause = _cause(e)
                if isinstance(cause, OutputBusy):
                    result = cause
                elif isinstance(cause, UEDatasetsError):
                    raise cause from None
                elif isinstance(cause, ray.exceptions.RayError):  # Ray has retried a crash already
                    failures[i] = f"{_describe(cause)} (Ray tried it {engine.max_retries + 1} times)"
                    continue
                elif tries[i] <= engine.max_retries:
                    running[submit(i)] = i
                    continue
                else:
                    failures[i] = f"{_describe(cause)} (tried {tries[i]} times)"
                    continue
            yield i, result
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
    if failures:
        raise RayTasksFailed({names[i]: failures[i] for i in sorted(failures)}, len(calls))


def remote_function(ray: Any, fn: Callable[..., Any], engine: RayEngine) -> Any:
    """``fn`` as a Ray remote function holding the engine's CPUs and GPUs per task."""
    return ray.remote(fn).options(num_cpus=engine.cpus_per_task, num_gpus=engine.gpus_per_task,
                                  max_retries=engine.max_retries)


def ray_tasks(engine: RayEngine) -> Callable[..., Iterator[tuple[int, Outcome]]]:
    """A distributor (`ue_datasets.apply.distribute`) running one Ray task per file."""
    require_ray()

    def distribute(rewrite: Callable[..., dict[str, Any]], protection: Protection, jobs: Sequence[Job], options: Any,
                   overwrite: bool, progress: bool) -> Iterator[tuple[int, Outcome]]:
        if options.device not in ("auto", "cpu") and engine.gpus_per_task == 0:
            raise UEDatasetsError(f"device {options.device!r} on Ray needs GPUs for its tasks: give gpus_per_task "
                                  "(--gpus-per-task)")
        with ray_session(engine.address) as ray:
            shared = ray.put(protection)
            threads = max(1, int(engine.cpus_per_task))
            calls = {i: (rewrite, shared, src, dst, options, overwrite, threads, engine.gpus_per_task)
                     for i, src, dst in jobs}
            names = {i: os.path.basename(src.rstrip("/")) for i, src, _ in jobs}
            yield from each_task(ray, remote_function(ray, _file_task, engine), calls, names, engine)

    return distribute


class ProtectBatches:
    """A callable class for ``ray.data.Dataset.map_batches`` that protects an image column.

    Rows as ``read_webdataset(decoder=None)`` gives them (``__key__``, ``png``/``jpg``..., ``cls`` as
    bytes), as ``read_parquet`` or ``from_huggingface`` give them (an ``image`` column of
    ``{"bytes", "path"}`` structs or of bytes, a ``label`` column). The image comes back as new lossless
    bytes in the same form (a struct stays a struct), every other column unchanged; rows a sample-wise
    protection needs keys for take them from ``key_column`` or ``__key__``. A webdataset image column
    (named by its extension) is renamed after the written format (``jpg`` becomes ``png``), as the shard
    rewriter does.

    Args:
        protection: an artifact directory (loaded once per actor) or a `Protection`.
        image_column: default ``image``, else the first column named by an image extension.
        label_column: default ``label``, else ``cls``.
        key_column: default ``__key__`` when present.
        digest: the artifact's digest (`Protection.digest`), checked when the actor loads it.
        device: ``"auto"``: the actor's GPU (ask for one with ``num_gpus`` and a ``batch_size``) or CPU.
        on_error: ``"fail"`` raises naming the row; ``"skip"`` drops it with a warning (in the actor's log).
        format, png_level, max_pixels, unfitted, keep_columns, text_column, class_names, template: as
            `ue_datasets.apply.hf.ProtectMap` takes them.
    """

    def __init__(
        self,
        protection: Protection | str | os.PathLike,
        image_column: str | None = None,
        label_column: str | None = None,
        key_column: str | None = None,
        digest: str | None = None,
        device: str = "auto",
        on_error: str = "fail",
        format: str = "png",
        png_level: int = PNG_LEVEL,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        unfitted: str = "error",
        keep_columns: Sequence[str] = (),
        text_column: str | None = None,
        class_names: Sequence[str] = (),
        template: str | None = None,
    ):
        if on_error not in ON_ERROR:
            raise UEDatasetsError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if unfitted not in UNFITTED:
            raise UEDatasetsError(f"unfitted must be one of {UNFITTED}, got {unfitted!r}")
        self.protection = as_protection(protection)
        if digest is not None and self.protection.digest != digest:
            raise UEDatasetsError(f"{protection}: the artifact is not the one given by its digest (it changed?)")
        self.image_column, self.label_column, self.key_column = image_column, label_column, key_column
        self.device, self.on_error, self.max_pixels, self.unfitted = device, on_error, max_pixels, unfitted
        self.output_format = OutputFormat.parse(format, png_level)
        self.keep_columns = field_names(keep_columns)
        self.text_source = TextSource(text_column, tuple(class_names), template)
        self.skipped: list[dict[str, str]] = []
        self.unprotected: list[dict[str, str]] = []

    def _columns(self, columns: Sequence[str]) -> tuple[str, str]:
        image = self.image_column or ("image" if "image" in columns else next(
            (c for c in columns if c.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS), "image"))
        label = self.label_column or ("label" if "label" in columns or "cls" not in columns else "cls")
        return image, label

    def _keys(self, batch: dict[str, Any], n: int) -> list[str]:
        column = self.key_column or ("__key__" if "__key__" in batch else None)
        if column is None:
            if needs_keys(self.protection):
                raise UEDatasetsError("this protection needs sample keys: give key_column (webdataset rows have "
                                      "__key__)")
            return [f"batch row {i}" for i in range(n)]
        if column not in batch:
            raise UEDatasetsError(f"key column {column!r} not in the dataset (columns: {sorted(batch)})")
        return [k.decode() if isinstance(k, bytes) else str(k) for k in batch[column]]

    def __call__(self, batch: Any) -> dict[str, Any]:
        """Protect one batch: a dict of columns (``batch_format="numpy"``, the default) or a pandas frame."""
        if not isinstance(batch, dict):
            batch = {c: batch[c].to_numpy() for c in batch.columns}
        image, label = self._columns(list(batch))
        n = len(batch[image]) if image in batch else 0
        options = RowOptions(image, label, self.on_error, self.output_format.png_level, self.max_pixels,
                             self.unfitted, self.keep_columns, None, self.text_source,
                             str(batch["__url__"][0]) if n and "__url__" in batch else "ray dataset",
                             self.output_format.spec)

        def class_id(value: Any) -> Any:
            return label_of({label: value}, label) if isinstance(value, (bytes, bytearray, str)) else value

        keep, encoded = protect_rows(self.protection, batch, lambda rows: self._keys(batch, rows), options,
                                     self.device, self.skipped, self.unprotected, warn_skipped=True, label=class_id)
        rows = np.asarray(keep, dtype=np.int64)
        out = {c: np.asarray(v)[rows] if len(keep) < n else v for c, v in batch.items() if c != image}
        cells = np.empty(len(encoded), dtype=object)
        structs = n and isinstance(batch[image][0], dict)
        for j, data in enumerate(encoded):
            cells[j] = {"bytes": bytes(data), "path": None} if structs else bytes(data)
        out[self._output_column(image, batch)] = cells
        return out

    def _output_column(self, image: str, batch: dict[str, Any]) -> str:
        """A webdataset image column (named by its extension) is renamed after the written format, as the
        shard rewriter names fields (``jpg`` -> ``png``; ``jpg.png`` when ``png`` is taken)."""
        stem, _, extension = image.rpartition(".")
        if extension.lower() not in IMAGE_EXTENSIONS:
            return image
        name = f"{stem}.{self.output_format.extension}" if stem else self.output_format.extension
        return name if name == image or name not in batch else f"{image}.{self.output_format.extension}"
