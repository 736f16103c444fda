"""Shard-level, resumable file rewriting shared by the webdataset and parquet rewriters.

The model is img2dataset's: one input file gives one output file of the same name; it is written as
``NAME.partial`` and renamed when complete, then ``STEM_stats.json`` is written, last, as the mark that
the file is done. A rerun skips files whose stats name the same protection id and redoes the rest,
so a killed run resumes and ends with the same bytes as an uninterrupted one. Files are independent,
so they can be rewritten by several processes (spawned, so CUDA works in them).
"""

from __future__ import annotations

import json
import multiprocessing
import posixpath
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import torch

from ..artifact import Protection
from ..errors import SourceError, UEDatasetsError
from ..version import __version__
from .core import needs_keys, resolve_device, selected
from .images import PNG_LEVEL

ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class ShardOptions:
    """How samples are read and protected.

    Attributes:
        label_field: field or column holding the class id (webdataset ``cls``; ``label`` in tables).
        image_field: field or column holding the image; ``None`` picks it (first image extension of a
            webdataset sample; ``image`` in tables).
        key_field: column of stable sample keys in tables (default: the row index in the file);
            webdataset samples always use ``__key__``.
        batch_size: samples per call of the tensor core.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        on_error: ``"fail"`` raises on the first bad sample; ``"skip"`` leaves it out and records
            its key and the reason in the stats.
        png_level: zlib level of the written PNGs (lossless at any level).
    """

    label_field: str = "cls"
    image_field: str | None = None
    key_field: str | None = None
    batch_size: int = 64
    device: str = "auto"
    on_error: str = "fail"
    png_level: int = PNG_LEVEL

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise UEDatasetsError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.batch_size < 1:
            raise UEDatasetsError(f"batch_size must be >= 1, got {self.batch_size}")

    def replace(self, **changes: Any) -> ShardOptions:
        return ShardOptions(**{**asdict(self), **changes})


@dataclass
class ShardStats:
    """What happened to one file; written as ``STEM_stats.json`` once the file is complete."""

    input: str
    output: str
    samples: int = 0
    written: int = 0
    protected: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    protection: dict[str, str] = field(default_factory=dict)
    ue_datasets_version: str = __version__
    resumed: bool = False

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})


#: ``rewrite(protection, in_url, out_url, options, progress) -> ShardStats``; module-level, so picklable.
Rewrite = Callable[[Protection, str, str, ShardOptions, Callable[[int], None] | None], ShardStats]


def output_name(url: str) -> str:
    """The output file's base name: the input's, with ``.tar.gz``/``.tgz`` written as ``.tar``."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name


def stats_url(out_url: str) -> str:
    """``dir/NAME.tar`` -> ``dir/NAME_stats.json`` (likewise ``.parquet``)."""
    head, base = posixpath.split(out_url)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return posixpath.join(head, stem + "_stats.json") if head else stem + "_stats.json"


def atomic_write(url: str, write: Callable[[Any], Any]) -> Any:
    """Run ``write(fileobj)`` on ``URL.partial``, then rename it to ``url``; on failure remove it."""
    fs, path = fsspec.core.url_to_fs(url)
    partial = path + ".partial"
    try:
        with fs.open(partial, "wb") as f:
            result = write(f)
        fs.mv(partial, path)
    except BaseException:
        try:
            fs.rm(partial)
        except (FileNotFoundError, OSError):
            pass
        raise
    return result


def check_not_empty(stats: ShardStats, options: ShardOptions, reason: str) -> None:
    """A file that yielded no sample fails, or with ``on_error="skip"`` is recorded as skipped."""
    if stats.samples == 0 and not stats.skipped:
        if options.on_error == "fail":
            raise SourceError(stats.input, reason)
        stats.skip("", reason)


def finish(stats: ShardStats, protection: Protection, written_keys: Sequence[str], start: float) -> ShardStats:
    """Count what was written and protected, then write the stats file: the mark that the file is done."""
    stats.written = len(written_keys)
    stats.protected = int(selected(protection, written_keys).sum()) if needs_keys(protection) else len(written_keys)
    stats.seconds = round(time.perf_counter() - start, 4)
    payload = (json.dumps(asdict(stats), indent=2) + "\n").encode()
    atomic_write(stats_url(stats.output), lambda f: f.write(payload))
    return stats


def read_stats(out_url: str) -> dict[str, Any] | None:
    """The stats of a completed output file, or ``None`` when it is not complete."""
    fs, path = fsspec.core.url_to_fs(stats_url(out_url))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def plan(inputs: Sequence[str], output_dir: str) -> list[tuple[str, str]]:
    """Pair each input with its output URL in ``output_dir``; two inputs may not share a name."""
    pairs, seen = [], {}
    for url in inputs:
        name = output_name(url)
        if name in seen:
            raise UEDatasetsError(f"inputs {seen[name]} and {url} would both be written as {name}")
        seen[name] = url
        out = output_dir.rstrip("/") + "/" + name
        if fsspec.core.url_to_fs(out)[1] == fsspec.core.url_to_fs(url)[1]:
            raise UEDatasetsError(f"{url}: the output would overwrite the input; choose another output folder")
        pairs.append((url, out))
    return pairs


def _worker_device(device: str, worker: int) -> str:
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"
    return device


@contextmanager
def _core_threads(options: ShardOptions) -> Iterator[None]:
    """On CPU, run the tensor core single-threaded while rewriting files.

    The decode/encode pool already keeps every core busy and overlaps with the core; intra-op
    threads on top only oversubscribe the cores (and stall badly on a loaded machine).
    """
    if resolve_device(options.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _task(rewrite: Rewrite, protection: Protection, in_url: str, out_url: str, options: ShardOptions, worker: int):
    torch.set_num_threads(1)
    return asdict(rewrite(protection, in_url, out_url, options.replace(device=_worker_device(options.device, worker)), None))


def run(
    rewrite: Rewrite,
    protection: Protection,
    inputs: Sequence[str],
    output_dir: str,
    options: ShardOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rewrite every input file into ``output_dir`` with ``rewrite``, resuming finished ones.

    Returns:
        The stats of every file, in input order (``resumed: True`` for files done earlier).

    Raises:
        UEDatasetsError: an output file was completed with another protection (unless ``overwrite``).
    """
    from tqdm.auto import tqdm

    pairs = plan(inputs, output_dir)
    fs, out_path = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(out_path, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, (_, dst) in enumerate(pairs):
        done = None if overwrite else read_stats(dst)
        if done is None:
            todo.append(i)
            continue
        other = done.get("protection", {}).get("id")
        if other != protection.id:
            raise UEDatasetsError(
                f"{dst} was completed with another protection ({other}); write to a new output or pass --overwrite"
            )
        results[i] = {**done, "resumed": True}
    bar = tqdm(total=len(pairs), initial=len(results), unit="file", desc="protect", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            with tqdm(unit="img", desc="samples", disable=not progress, leave=False) as samples, _core_threads(options):
                for i in todo:
                    results[i] = asdict(rewrite(protection, *pairs[i], options, samples.update))
                    bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                jobs = {
                    pool.submit(_task, rewrite, protection, *pairs[i], options, n): i for n, i in enumerate(todo)
                }
                for job in as_completed(jobs):
                    results[jobs[job]] = job.result()
                    bar.update(1)
    finally:
        bar.close()
    return [results[i] for i in range(len(pairs))]
