"""Find what a protected output must not publish: local paths, the artifact's digest or files, leftovers.

Looked into: every text file (JSON parsed, so a finding names its field: stats files, ``state.json``,
``dataset_info.json``, notes), the non-image fields and keys of webdataset samples, the non-image values
of parquet and Arrow (``save_to_disk``) rows (the ``path`` of ``{bytes, path}`` image structs among
them) and parquet schema metadata. Image bytes and other binary files are never scanned, so pixels that
happen to spell ``/tmp`` raise nothing.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from ..artifact import FORMAT_NAME, MANIFEST, TENSORS
from ..errors import SampleError, UEDatasetsError
from .commit import LOCK_SUFFIX, PARTIAL_INFIX
from .images import IMAGE_EXTENSIONS, looks_like_image
from .shards import PARQUET_SUFFIX, SHARD_SUFFIXES
from .sources import resolve

#: Findings listed per file; the rest are counted in one last finding.
PER_FILE = 20
#: Larger files that are not tar, parquet or Arrow are taken as binary and not scanned.
TEXT_LIMIT = 64 << 20
DIGEST = "the artifact's digest (lets anyone test guesses of the key offline)"
#: Absolute paths of common local roots, not inside a URL or a relative path; Windows drive paths: a
#: drive letter not after a letter, ``$`` or ``\`` (not ``$f:\mathbb{R}$``), then ``\`` (or an escaped one) and a name
#: that ends at a ``\``, a space, punctuation or the end (not a LaTeX command and its ``{``), or ``/Users/``.
_LOCAL_PATH = re.compile(r"(?<![\w.~-])/(?:home|tmp|Users|root|mnt|media|private|var/folders)/[^\s\"'<>|]*"
                         r"|(?<![\w$\\])[A-Za-z]:(?:\\{1,2}[\w.~()-]*[\w)~-](?=\\|[.,;:]?(?:[\s\"'<>|]|$))|/Users/)[^\s\"'<>|]*")


@dataclass(frozen=True)
class Finding:
    """One problem in one file: ``where`` in it (a field, sample, row or line; ``""``: the file itself)."""

    file: str
    where: str
    reason: str


@dataclass(frozen=True)
class Needles:
    """What must not be published: local paths, each with what it is, and the artifact digest's hex."""

    paths: tuple[tuple[str, str], ...] = ()
    digest: str = ""

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern[str], str]]:
        """Each path as a whole path (not the start of a longer name), with what it is, longest first."""
        return [(re.compile(rf"(?<![\w.~-]){re.escape(p)}(?![\w.-])"), f"{what} ({p})") for p, what in self.paths]

    def reasons(self, text: str) -> list[str]:
        """Why ``text`` must not be published (``[]``: it may be)."""
        found = [DIGEST] if self.digest and self.digest in text.lower() else []
        for pattern, reason in self._patterns:  # the most specific name only
            if pattern.search(text):
                return found + [reason]
        match = _LOCAL_PATH.search(text)
        return found + ([f"an absolute local path ({match.group()[:80]})"] if match else [])


def local_needles(locations: dict[str, str | None], digest: str | None) -> Needles:
    """`Needles` for local ``locations`` (``{what: path or URL}``; remote URLs are left out), the home and
    working directories, and ``digest`` (``sha256:HEX``)."""
    named = {**locations, "the home directory": os.path.expanduser("~"), "the working directory": os.getcwd()}
    paths: dict[str, str] = {}
    for what, location in named.items():
        if not location:
            continue
        fs, local = fsspec.core.url_to_fs(location)
        if not isinstance(fs, LocalFileSystem):
            continue
        for p in (os.path.abspath(local), os.path.realpath(local)):
            p = p.rstrip(os.sep)
            if len(p) > 3:
                paths.setdefault(p, what)
    ordered = tuple(sorted(paths.items(), key=lambda item: -len(item[0])))
    return Needles(ordered, (digest or "").removeprefix("sha256:").lower())


def published_files(output: str) -> tuple[str, list[str]]:
    """The folder a publisher uploads and the files in it: everything below ``output`` when it is a
    folder; for files or patterns, each file with its stats, lock and partial files beside it.

    Returns:
        ``(root, paths)``: filesystem paths, ``root`` the folder names are shown relative to.
    """
    fs, path = fsspec.core.url_to_fs(output)
    if fs.isdir(path):
        return path, sorted(fs.find(path))
    urls = resolve(output).urls
    found: set[str] = set()
    for url in urls:
        head, base = posixpath.split(fsspec.core.url_to_fs(url)[1])
        stem = base.rsplit(".", 1)[0]
        found.update(n for n in fs.ls(head or ".", detail=False) if fs.isfile(n) and (
            posixpath.basename(n).startswith((base, stem + "_stats.json"))))
    root = posixpath.commonpath(sorted(posixpath.dirname(p) for p in found)) if found else ""
    return root, sorted(found)


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(where, text)`` for every string in ``value`` (dict keys too); bytes that are no image and
    decode as UTF-8 count as text."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if b"\0" not in data and not looks_like_image(data):
            try:
                yield where, data.decode("utf-8")
            except UnicodeDecodeError:
                pass
    elif isinstance(value, dict):
        for k, v in value.items():
            inner = f"{where}.{k}" if where else str(k)
            yield from _strings(str(k), inner)
            yield from _strings(v, inner)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")


def _tar_strings(f: Any, name: str) -> Iterator[tuple[str, str]]:
    from .wds import read_samples

    for sample in read_samples(f, name):
        if isinstance(sample, SampleError):  # unusable as a sample; its key is still published
            yield f"sample {sample.key!r} key", sample.key
            continue
        key = sample["__key__"]
        yield f"sample {key!r} key", key
        for field, data in sample.items():
            if field not in ("__key__", "__url__") and field.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                yield from _strings(data, f"sample {key!r} field {field!r}")


def _rows(batches: Iterator[Any]) -> Iterator[tuple[str, str]]:
    offset = 0
    for batch in batches:
        for i, row in enumerate(batch.to_pylist()):
            for column, value in row.items():
                yield from _strings(value, f"row {offset + i} column {column!r}")
        offset += batch.num_rows


def _parquet_strings(f: Any) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    for k, v in (parquet.schema_arrow.metadata or {}).items():
        yield from _strings(v, f"schema metadata {k.decode(errors='replace')!r}")
    yield from _rows(parquet.iter_batches(batch_size=256))


def _arrow_strings(f: Any) -> Iterator[tuple[str, str]]:
    try:
        reader = pa.ipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
        reader = pa.ipc.open_file(f)
        yield from _rows(reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from _rows(iter(reader))


def _text_strings(data: bytes, name: str) -> Iterator[tuple[str, str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if name.endswith(".json"):
        try:
            yield from _strings(json.loads(text), "")
            return
        except ValueError:
            pass
    for n, line in enumerate(text.splitlines(), 1):
        yield f"line {n}", line


def _contents(fs: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(where, text)`` for the text in one file, by its kind (see the module docstring)."""
    name = posixpath.basename(path).lower()
    with fs.open(path, "rb") as f:
        if name.endswith(SHARD_SUFFIXES):
            yield from _tar_strings(f, name)
        elif name.endswith(PARQUET_SUFFIX):
            yield from _parquet_strings(f)
        elif name.endswith(".arrow"):
            yield from _arrow_strings(f)
        elif name.rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS and fs.size(path) <= TEXT_LIMIT:
            data = f.read()
            if b"\0" not in data and not looks_like_image(data):
                yield from _text_strings(data, name)


def _file_kind(fs: Any, path: str) -> str | None:
    """Why a file must not be published by its kind alone (``None``: look into it)."""
    base = posixpath.basename(path)
    if base.endswith(LOCK_SUFFIX):
        return "a lock file left by a running or killed protect: never publish it"
    if PARTIAL_INFIX in base:
        return "a partial file left by a killed protect: never publish it"
    if base == TENSORS:
        return "the protection artifact's secret tensors: never publish them"
    if base == MANIFEST:
        try:
            with fs.open(path, "rb") as f:
                manifest = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return None
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME:
            return "a protection artifact's manifest (it holds the digest): never publish it"
    return None


def scan(output: str, look_for: Needles) -> list[Finding]:
    """Every finding in what would be published with ``output`` (see `published_files`)."""
    root, paths = published_files(output)
    fs = fsspec.core.url_to_fs(output)[0]
    findings: list[Finding] = []
    for path in paths:
        rel = posixpath.relpath(path, root) if root else path
        kind = _file_kind(fs, path)
        if kind is not None:
            findings.append(Finding(rel, "", kind))
            continue
        count = 0
        try:
            for where, text in _contents(fs, path):
                for reason in look_for.reasons(text):
                    count += 1
                    if count <= PER_FILE:
                        findings.append(Finding(rel, where, reason))
        except (UEDatasetsError, OSError, ValueError, pa.ArrowException) as e:
            findings.append(Finding(rel, "", f"cannot be read to look for leaks ({type(e).__name__}: {e})"))
        if count > PER_FILE:
            findings.append(Finding(rel, "", f"{count - PER_FILE} more finding(s) like the ones above"))
    return findings
