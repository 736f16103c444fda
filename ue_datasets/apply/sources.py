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

import json
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
from braceexpand import braceexpand

from ..artifact import Protection
from ..errors import UEDatasetsError
from ..version import __version__
from .core import needs_keys, selected
from .shards import ShardOptions

HF_MARKERS = ("state.json", "dataset_dict.json")
HF_STATS = "ue_datasets_stats.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class Source:
    """A resolved input: its kind (``wds``, ``parquet`` or ``hf``) and its URLs."""

    kind: str
    urls: list[str] = field(default_factory=list)


def _is_hf_dir(fs: Any, path: str) -> bool:
    return any(fs.exists(posixpath.join(path, m)) for m in HF_MARKERS)


def _kind_of(url: str) -> str | None:
    if url.endswith(SHARD_SUFFIXES):
        return "wds"
    if url.endswith(".parquet"):
        return "parquet"
    return None


def resolve(src: str) -> Source:
    """Expand braces and globs and tell the kind of ``src`` (see the module docstring)."""
    if src.startswith("pipe:"):
        raise UEDatasetsError(f"{src}: pipe: URLs run shell commands and are not run; give a path or an fsspec URL")
    urls: list[str] = []
    for pattern in braceexpand(src):
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            urls.extend(sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in fs.glob(path)))
        elif fs.isdir(path):
            if _is_hf_dir(fs, path):
                return Source("hf", [pattern])
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
    return Source(kinds.pop(), urls)


def _protect_hf(
    protection: Protection, src: str, dst: str, options: ShardOptions, overwrite: bool, progress: bool
) -> dict[str, Any]:
    import datasets

    from .hf import protect_dataset

    fs, out = fsspec.core.url_to_fs(dst)
    stats_path = posixpath.join(out, HF_STATS)
    if fs.exists(stats_path) and not overwrite:
        with fs.open(stats_path, "rb") as f:
            done = json.loads(f.read())
        if done.get("protection", {}).get("id") != protection.id:
            raise UEDatasetsError(f"{dst} was written with another protection; write to a new output or pass --overwrite")
        return {**done, "resumed": True}
    if fs.exists(out) and not overwrite and fs.ls(out):
        raise UEDatasetsError(f"{dst}: exists and is not a completed protection output; pass --overwrite")
    start = time.perf_counter()
    if not progress:
        datasets.disable_progress_bars()
    dataset = datasets.load_from_disk(src)
    splits = dataset if isinstance(dataset, datasets.DatasetDict) else {None: dataset}
    skipped: list[dict[str, str]] = []
    partial = out.rstrip("/") + ".partial"
    if fs.exists(partial):
        fs.rm(partial, recursive=True)
    with tempfile.TemporaryDirectory(prefix="ue-datasets-cache-") as cache:
        outputs = {}
        for split, ds in splits.items():
            name = f"{src}[{split}]" if split is not None else src
            outputs[split] = protect_dataset(
                ds, protection, image_column=options.image_field or "image", label_column=options.label_field,
                key_column=options.key_field, batch_size=options.batch_size, device=options.device,
                on_error=options.on_error, png_level=options.png_level, source=name, skipped=skipped,
                cache_file_name=posixpath.join(cache, f"{split or 'data'}.arrow"),
            )
        result = outputs[None] if None in outputs else datasets.DatasetDict(outputs)
        result.save_to_disk(fs.unstrip_protocol(partial) if "://" in dst else partial)
    samples = sum(len(d) for d in splits.values())
    written = sum(len(d) for d in outputs.values())
    protected = written
    if needs_keys(protection):  # count the rows a partial protection covers, by the keys ProtectMap used
        protected = 0
        for split, ds in outputs.items():
            name = f"{src}[{split}]" if split is not None else src
            column = options.key_field or ("__key__" if "__key__" in ds.column_names else None)
            if column is not None:
                keys = [str(k) for k in ds[column]]
            else:
                dropped = {s["key"] for s in skipped if s["source"] == name}
                keys = [str(i) for i in range(len(splits[split])) if str(i) not in dropped]
            protected += int(selected(protection, keys).sum())
    stats = {
        "input": src, "output": dst, "samples": samples, "written": written, "protected": protected,
        "skipped": skipped, "seconds": round(time.perf_counter() - start, 4),
        "protection": protection.public(),
        "ue_datasets_version": __version__, "resumed": False,
    }
    with fs.open(posixpath.join(partial, HF_STATS), "wb") as f:
        f.write((json.dumps(stats, indent=2) + "\n").encode())
    if fs.exists(out):
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            shutil.rmtree(out)
        else:
            fs.rm(out, recursive=True)
    fs.mv(partial, out, recursive=True)
    return stats


def protect_source(
    protection: Protection,
    src: str,
    dst: str,
    options: ShardOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Source, list[dict[str, Any]]]:
    """Protect ``src`` into ``dst`` (same form); returns the resolved source and per-file stats."""
    source = resolve(src)
    if source.kind == "hf":
        return source, [_protect_hf(protection, source.urls[0], dst, options, overwrite, progress)]
    if source.kind == "wds":
        from .wds import protect_shards

        return source, protect_shards(protection, source.urls, dst, options, workers, overwrite, progress)
    from .parquet import protect_parquet

    return source, protect_parquet(protection, source.urls, dst, options, workers, overwrite, progress)
