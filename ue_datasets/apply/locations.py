"""Where a path or URL really points, so that an output can never alias its input.

Paths are compared by location, not by spelling: local paths through ``realpath`` (symlinks,
``..``, ``.`` and doubled slashes resolved) and, where they exist, by device and inode (so a
case-insensitive or bind-mounted folder compares equal too); fsspec URLs by protocol and normalised
path. Every rewriter checks its plan with `check_output` before it writes anything.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from ..errors import UEDatasetsError

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Location:
    """A resolved location: ``protocol`` (``"file"`` for local paths) and an absolute normalised path."""

    protocol: str
    path: str

    @property
    def local(self) -> bool:
        return self.protocol == "file"


def locate(url: str) -> Location:
    """The `Location` of a path or fsspec URL (it need not exist)."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if isinstance(fs, LocalFileSystem):
        real = os.path.realpath(path)
        return Location("file", "/" + real.lstrip("/") if real.startswith("//") else real)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return Location(protocol, posixpath.normpath("/" + path.lstrip("/")))


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same(a: Location, b: Location) -> bool:
    """Whether ``a`` and ``b`` are one file or folder."""
    if a.protocol != b.protocol:
        return False
    if a.path == b.path:
        return True
    if a.local:
        ia, ib = _inode(a.path), _inode(b.path)
        return ia is not None and ia == ib
    return False


def inside(child: Location, parent: Location) -> bool:
    """Whether ``child`` is ``parent`` or lies below it."""
    if child.protocol != parent.protocol:
        return False
    path = child.path
    while True:
        if same(Location(child.protocol, path), parent):
            return True
        up = posixpath.dirname(path)
        if up == path:
            return False
        path = up


def pattern_matches(pattern: str, url: str) -> bool:
    """Whether ``url`` would be matched by the glob ``pattern`` (a path or URL with ``*?[`` in it)."""
    fs, path = fsspec.core.url_to_fs(pattern)
    parts = path.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
    head = "/".join(parts[:fixed]) or "/"
    base = locate(fs.unstrip_protocol(head) if "://" in pattern else head)
    target = locate(url)
    if target.protocol != base.protocol:
        return False
    regex = glob_translate(posixpath.join(base.path, *parts[fixed:]))
    return re.match(regex, target.path) is not None


def reads_back(pattern: str, output: str) -> bool:
    """Whether the input ``pattern`` (one brace-expanded input: a file, folder or glob) would read ``output``."""
    if any(c in fsspec.core.url_to_fs(pattern)[1] for c in GLOB_CHARS):
        return pattern_matches(pattern, output)
    src, out = locate(pattern), locate(output)
    return same(src, out) or same(src, Location(out.protocol, posixpath.dirname(out.path)))


def check_output(patterns: list[str], inputs: list[str], outputs: list[str]) -> None:
    """Refuse a plan whose output files would overwrite an input or be read back by the input patterns.

    Args:
        patterns: the input as given, brace-expanded (files, folders, globs).
        inputs: the input files they resolved to.
        outputs: the output files the plan would write.

    Raises:
        UEDatasetsError: naming the output and the input it aliases.
    """
    located = [(url, locate(url)) for url in inputs]
    for out in outputs:
        where = locate(out)
        for url, loc in located:
            if same(where, loc):
                raise UEDatasetsError(f"{out}: is the input {url} (the output would overwrite it); "
                                      "choose an output folder outside the input")
        for pattern in patterns:
            if reads_back(pattern, out):
                raise UEDatasetsError(f"{out}: lies where the input {pattern!r} reads from, so a rerun would "
                                      "read protected files back as input; choose an output folder outside it")


def check_dataset_output(src: str, dst: str) -> None:
    """Refuse a dataset directory output that is, holds, or lies inside its input directory."""
    a, b = locate(src), locate(dst)
    if same(a, b):
        raise UEDatasetsError(f"{dst}: is the input dataset {src}; choose another output directory")
    if inside(b, a):
        raise UEDatasetsError(f"{dst}: lies inside the input dataset {src}; choose a directory outside it")
    if inside(a, b):
        raise UEDatasetsError(f"{dst}: holds the input dataset {src}; choose a directory that does not contain it")
