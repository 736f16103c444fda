"""Inputs the CLI accepts, and protecting one input into an output of the same form.

A source is one of:

* webdataset shards: a ``.tar`` (or ``.tar.gz``) path or fsspec URL, a brace pattern
  (``shards/train-{000..009}.tar``), a glob, or a folder of shards: written to a folder of shards
  with the same names;
* a ``save_to_disk`` dataset directory (a `Dataset` or a `DatasetDict`): written to a dataset
  directory that ``load_from_disk`` reads;
* parquet files (path, pattern or folder): written to a folder of parquet files with the same names.

``pipe:`` URLs are refused: they run shell commands, and a source is data, never code.
"""

from __future__ import annotations

import errno
import os
import posixpath
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
from braceexpand import braceexpand

from ..artifact import Protection
from ..errors import SourceError, UEDatasetsError
from ..progress import is_terminal
from ..version import __version__
from .commit import (
    OutputLock,
    checks_out,
    discard,
    file_digest,
    is_partial_of,
    output_error,
    partial_url,
    read_json,
    remove_partials,
    rename,
    source_identity,
    write_json,
)
from .core import needs_keys, selected
from .locations import check_dataset_output
from .shards import PARQUET_SUFFIX, SHARD_SUFFIXES, ShardOptions, other_protection

HF_MARKERS = ("state.json", "dataset_dict.json")
HF_STATS = "ue_datasets_stats.json"
KIND_NAMES = {"wds": "webdataset shards", "parquet": "parquet files", "hf": "a save_to_disk dataset"}


@dataclass
class Source:
    """A resolved input: its kind (``wds``, ``parquet`` or ``hf``), its URLs, and the brace-expanded
    patterns they came from (files, folders, globs)."""

    kind: str
    urls: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)


def _is_hf_dir(fs: Any, path: str) -> bool:
    return any(fs.exists(posixpath.join(path, m)) for m in HF_MARKERS)


def _kind_of(url: str) -> str | None:
    if url.endswith(SHARD_SUFFIXES):
        return "wds"
    if url.endswith(PARQUET_SUFFIX):
        return "parquet"
    return None


def resolve(src: str | os.PathLike | Sequence[str | os.PathLike]) -> Source:
    """Expand braces and globs and tell the kind of ``src`` (see the module docstring).

    ``src`` may also be several such inputs (``--input a/*.tar b/*.tar``, or the files an unquoted
    shell glob expanded to): they must all be shards or all parquet files; a dataset directory is
    given alone. Paths may be ``pathlib.Path``s.
    """
    if isinstance(src, (str, os.PathLike)):
        return _resolve_one(os.fspath(src))
    inputs = [os.fspath(s) for s in src]
    if not inputs:
        raise UEDatasetsError("no input given")
    if len(inputs) == 1:
        return _resolve_one(inputs[0])
    sources = [_resolve_one(s) for s in inputs]
    if any(s.kind == "hf" for s in sources):
        hf = next(i for i, s in zip(inputs, sources) if s.kind == "hf")
        raise UEDatasetsError(f"{hf}: a save_to_disk dataset is protected alone, not with other inputs")
    if len({s.kind for s in sources}) > 1:
        raise UEDatasetsError(f"{' '.join(inputs)}: mixes shards and parquet files; protect them separately")
    urls = [u for s in sources for u in s.urls]
    twice = [u for u, n in Counter(urls).items() if n > 1]
    if twice:
        raise UEDatasetsError(f"{twice[0]}: given twice (the inputs overlap); name each file once")
    return Source(sources[0].kind, urls, [p for s in sources for p in s.patterns])


def _resolve_one(src: str) -> Source:
    if src.startswith("pipe:"):
        raise UEDatasetsError(f"{src}: pipe: URLs run shell commands and are not run; give a path or an fsspec URL")
    urls: list[str] = []
    patterns = list(braceexpand(src))
    for pattern in patterns:
        try:
            fs, path = fsspec.core.url_to_fs(pattern)
        except (ImportError, ValueError) as e:
            raise UEDatasetsError(f"{pattern}: cannot open this URL ({type(e).__name__}: {e})") from None
        if any(ch in path for ch in "*?["):
            urls.extend(sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(path)))
        elif fs.isdir(path):
            if _is_hf_dir(fs, path):
                return Source("hf", [pattern], [pattern])
            found = sorted(p for p in fs.ls(path, detail=False) if _kind_of(p))
            urls.extend(fs.unstrip_protocol(p) if "://" in pattern else p for p in found)
        elif fs.exists(path):
            urls.append(pattern)
        else:
            raise UEDatasetsError(f"{pattern}: no such file or directory")
    if not urls:
        raise UEDatasetsError(f"{src}: matches no shard, parquet file or dataset directory")
    kinds = {_kind_of(u) for u in urls}
    if None in kinds:
        bad = next(u for u in urls if _kind_of(u) is None)
        raise UEDatasetsError(f"{bad}: not a webdataset shard (.tar), a parquet file or a save_to_disk directory")
    if len(kinds) > 1:
        raise UEDatasetsError(f"{src}: mixes shards and parquet files; protect them separately")
    return Source(kinds.pop(), urls, patterns)


def _relative_name(name: object) -> bool:
    """Whether ``name`` is a plain relative file name inside a folder (no ``..``, not absolute)."""
    return (isinstance(name, str) and bool(name) and not name.startswith("/") and posixpath.normpath(name) == name
            and name.split("/", 1)[0] != ".." and name != HF_STATS)


def input_files(inputs: str | Sequence[str], kind: str) -> tuple[list[str], list[str] | None]:
    """The files of a rewriter's ``inputs`` and the patterns they came from.

    Args:
        inputs: a list of file URLs (taken as they are; patterns ``None``), or one string as
            ``ue-datasets protect --input`` takes it (a brace pattern, glob or folder).
        kind: what the files must be (``wds`` or ``parquet``).
    """
    if not isinstance(inputs, str):
        return list(inputs), None
    source = resolve(inputs)
    if source.kind != kind:
        raise UEDatasetsError(f"{inputs}: not {KIND_NAMES[kind]} (found {KIND_NAMES[source.kind]})")
    return source.urls, source.patterns


def _owned_dataset(dst: str, protection: Protection, overwrite: bool) -> dict[str, Any] | None:
    """The stats of a dataset output this package wrote (``None``: none yet); refuses anything else."""
    fs, out = fsspec.core.url_to_fs(dst)
    if fs.exists(out) and not fs.isdir(out):
        raise UEDatasetsError(f"{dst}: is a file, not a dataset directory")
    stats = read_json(posixpath.join(dst, HF_STATS))
    files = stats.get("files") if stats else None
    if (stats is None or not isinstance(stats.get("protection"), dict) or not isinstance(files, dict)
            or not all(map(_relative_name, files))):
        if fs.exists(out) and [n for n in fs.ls(out, detail=False)  # a stats partial of a killed commit is ours
                               if not is_partial_of(posixpath.basename(n), HF_STATS)]:
            raise UEDatasetsError(f"{dst}: exists and is not a dataset written by ue-datasets; nothing in it is "
                                  "replaced: choose a new or empty directory")
        return None
    other = stats["protection"].get("id")
    if other != protection.id and not overwrite:
        raise other_protection(dst, other)
    return stats


def _dataset_checks_out(dst: str, stats: dict[str, Any]) -> bool:
    return stats.get("complete", True) is True and all(
        checks_out(posixpath.join(dst, name), digest) for name, digest in stats["files"].items())


def _commit_dataset(partial: str, dst: str, stats: dict[str, Any], old: dict[str, Any] | None) -> None:
    """Move the files of ``partial`` into ``dst``, replacing only the files ``old`` says this package wrote.

    A file of ``dst`` that the new output would replace and that ``old`` does not list is refused
    before anything moves. The stats file is there while files move (first listing old and new files,
    marked incomplete), so an interrupted commit is recognised as this package's output and redone.
    """
    try:
        _move_dataset(partial, dst, stats, old)
    except OSError as e:
        raise output_error(dst, e) from None


def _move_dataset(partial: str, dst: str, stats: dict[str, Any], old: dict[str, Any] | None) -> None:
    fs, out = fsspec.core.url_to_fs(dst)
    owned = set(old["files"]) if old else set()
    foreign = [n for n in stats["files"] if n not in owned and fs.exists(posixpath.join(out, n))]
    if foreign:
        raise UEDatasetsError(f"{dst}: holds {', '.join(foreign)}, which ue-datasets did not write; nothing in it "
                              "is replaced: move it away or choose another directory")
    stale = owned - set(stats["files"])
    fs.makedirs(out, exist_ok=True)
    stats_at = posixpath.join(dst, HF_STATS)
    write_json(stats_at, {**stats, "complete": False, "files": {**{n: None for n in stale}, **stats["files"]}})
    for name in sorted(stale):
        try:
            fs.rm(posixpath.join(out, name))
        except FileNotFoundError:
            pass
    for name in stats["files"]:
        fs.makedirs(posixpath.dirname(posixpath.join(out, name)), exist_ok=True)
        rename(posixpath.join(partial, name), posixpath.join(dst, name))
    write_json(stats_at, stats)
    for name in sorted(stale, key=len, reverse=True):  # folders of old splits, once empty
        folder = posixpath.dirname(posixpath.join(out, name))
        if folder != out and fs.isdir(folder) and not fs.ls(folder, detail=False):
            fs.rmdir(folder)
    fs.rm(fsspec.core.url_to_fs(partial)[1], recursive=True)


def _protect_hf(
    protection: Protection, src: str, dst: str, options: ShardOptions, overwrite: bool, progress: bool
) -> dict[str, Any]:
    import datasets
    import pyarrow as pa

    dst = dst.rstrip("/")  # the partial and lock siblings of out/ are out.partial-..., out.lock
    check_dataset_output(src, dst)
    with OutputLock(dst):
        done = _owned_dataset(dst, protection, overwrite)
        remove_partials(dst, posixpath.join(dst, HF_STATS))  # what a killed run left, beside and inside
        source, settings = source_identity(src), options.settings()
        if (done is not None and not overwrite and done.get("source") == source and done.get("settings") == settings
                and _dataset_checks_out(dst, done)):
            return {**done, "resumed": True}
        start = time.perf_counter()
        quiet = not datasets.are_progress_bars_disabled() and not (progress and is_terminal(sys.stderr))
        if quiet:  # datasets' own bars: on a terminal only (in a log they are lines of carriage returns)
            datasets.disable_progress_bars()
        try:
            name = posixpath.basename(fsspec.core.url_to_fs(src)[1].rstrip("/"))
            try:
                dataset = datasets.load_from_disk(src)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as e:
                raise SourceError(src, f"cannot load the dataset ({type(e).__name__}: {e})") from None
            splits = dataset if isinstance(dataset, datasets.DatasetDict) else {None: dataset}
            partial = partial_url(dst)
            try:
                stats = _write_dataset(protection, src, dst, partial, name, splits, options, start)
                stats.update(source=source, settings=settings)
                _commit_dataset(partial, dst, stats, done)
            except BaseException:
                discard(partial)
                raise
        finally:
            if quiet:
                datasets.enable_progress_bars()
    return stats


def _write_dataset(protection: Protection, src: str, dst: str, partial: str, name: str, splits: Any,
                   options: ShardOptions, start: float) -> dict[str, Any]:
    """Protect every split of a loaded dataset into the ``partial`` directory; returns the stats to commit."""
    import datasets
    import pyarrow as pa

    from .hf import protect_dataset

    skipped: list[dict[str, str]] = []
    unprotected: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="ue-datasets-cache-") as cache:
        outputs = {}
        for split, ds in splits.items():
            source = f"{name}[{split}]" if split is not None else name
            try:
                outputs[split] = protect_dataset(
                    ds, protection, image_column=options.image_field or "image",
                    label_column=options.label_field, key_column=options.key_field,
                    batch_size=options.batch_size, device=options.device, on_error=options.on_error,
                    png_level=options.png_level, format=options.format, max_pixels=options.max_pixels,
                    keep_columns=options.keep_fields, source=source, skipped=skipped,
                    unfitted=options.unfitted, unprotected=unprotected, text_column=options.text_field,
                    class_names=options.class_names, template=options.template,
                    cache_file_name=posixpath.join(cache, f"{split or 'data'}.arrow"),
                )
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):  # the cache, not the input
                    raise output_error(cache, e) from None
                raise SourceError(src, f"cannot read the dataset ({type(e).__name__}: {e})") from None
            except pa.ArrowException as e:
                raise SourceError(src, f"cannot read the dataset ({type(e).__name__}: {e})") from None
        result = outputs[None] if None in outputs else datasets.DatasetDict(outputs)
        try:
            result.save_to_disk(partial)
        except OSError as e:
            raise output_error(dst, e) from None
    samples = sum(len(d) for d in splits.values())
    written = sum(len(d) for d in outputs.values())
    protected = written
    if needs_keys(protection):  # count the rows a partial protection covers, by the keys ProtectMap used
        protected = 0
        for split, ds in outputs.items():
            source = f"{name}[{split}]" if split is not None else name
            column = options.key_field or ("__key__" if "__key__" in ds.column_names else None)
            if column is not None:
                keys = [str(k) for k in ds[column]]
            else:
                dropped = {s["key"] for s in skipped if s["source"] == source}
                keys = [str(i) for i in range(len(splits[split])) if str(i) not in dropped]
            protected += int(selected(protection, keys).sum())
    protected -= len(unprotected)
    pfs, ppath = fsspec.core.url_to_fs(partial)
    files = {}
    for path in sorted(pfs.find(ppath)):
        rel = posixpath.relpath(path, ppath)
        files[rel] = file_digest(posixpath.join(partial, rel))
    stats = {
        "input": name, "output": posixpath.basename(fsspec.core.url_to_fs(dst)[1].rstrip("/")),
        "samples": samples, "written": written, "protected": protected, "unprotected": len(unprotected),
        "skipped": skipped, "seconds": round(time.perf_counter() - start, 4),
        "protection": protection.public(), "files": files,
        "ue_datasets_version": __version__, "resumed": False,
    }
    return stats


def protect_source(
    protection: Protection,
    src: str | Sequence[str] | Source,
    dst: str,
    options: ShardOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    engine: str | Any = "local",
) -> tuple[Source, list[dict[str, Any]]]:
    """Protect ``src`` (as `resolve` takes it, or resolved) into ``dst`` (same form); returns the
    resolved source and per-file stats. ``engine``: as `ue_datasets.apply.shards.run` takes it."""
    source = src if isinstance(src, Source) else resolve(src)
    if source.kind == "hf" and engine != "local":
        raise UEDatasetsError(f"{source.urls[0]}: the Ray engine rewrites shards and parquet files; a dataset "
                              "directory is protected locally (or read it with ray.data and map ProtectBatches)")
    if source.kind == "hf":
        return source, [_protect_hf(protection, source.urls[0], dst, options, overwrite, progress)]
    from .shards import run

    if source.kind == "wds":
        from .wds import protect_shard as rewrite
    else:
        from .parquet import protect_parquet_file as rewrite
    return source, run(rewrite, protection, source.urls, dst, options, workers, overwrite, progress, source.patterns,
                       engine)
