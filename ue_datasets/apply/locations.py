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
from collections.abc import Callable
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
    """The `Location` of a path or fsspec URL (it need not exist); a chained URL (``a::b``) is located
    by its last part, the filesystem that holds the data."""
    url = str(url).rsplit("::", 1)[-1]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except Exception as e:  # a missing backend (s3fs...), a bad URL, an unreachable server
        raise UEDatasetsError(f"{url}: cannot open this URL ({type(e).__name__}: {e})") from None
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


def _reader(pattern: str) -> Callable[[Location], bool]:
    """A test of whether one brace-expanded input pattern (a file, folder or glob) would read a file."""
    fs, path = fsspec.core.url_to_fs(pattern)
    parts = path.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS)), None)
    if fixed is None:  # a file reads itself; a folder, the files directly in it
        src = locate(pattern)
        return lambda out: same(src, out) or same(src, Location(out.protocol, posixpath.dirname(out.path)))
    head = "/".join(parts[:fixed]) or ("/" if path.startswith("/") else ".")
    base = locate(fs.unstrip_protocol(head) if "://" in pattern else head)
    regex = re.compile(glob_translate(posixpath.join(base.path, *parts[fixed:])))
    return lambda out: out.protocol == base.protocol and regex.match(out.path) is not None


def check_output(patterns: list[str], inputs: list[str], outputs: list[str]) -> None:
    """Refuse a plan whose output files would overwrite an input or be read back by the input patterns.

    Args:
        patterns: the input as given, brace-expanded (files, folders, globs).
        inputs: the input files they resolved to.
        outputs: the output files the plan would write.

    Raises:
        UEDatasetsError: naming the output and the input it aliases.
    """
    by_path: dict[tuple[str, str], str] = {}
    by_inode: dict[tuple[int, int], str] = {}
    for url in inputs:
        loc = locate(url)
        by_path[(loc.protocol, loc.path)] = url
        inode = _inode(loc.path) if loc.local else None
        if inode is not None:
            by_inode[inode] = url
    readers = [(pattern, _reader(pattern)) for pattern in patterns]
    for out in outputs:
        where = locate(out)
        inode = _inode(where.path) if where.local else None
        url = by_path.get((where.protocol, where.path)) or (by_inode.get(inode) if inode is not None else None)
        if url is not None:
            raise UEDatasetsError(f"{out}: is the input {url} (the output would overwrite it); "
                                  "choose an output folder outside the input")
        for pattern, reads in readers:
            if reads(where):
                raise UEDatasetsError(f"{out}: lies where the input {pattern!r} reads from, so a rerun would "
                                      "read protected files back as input; choose an output folder outside it")


def check_output_name(output: str) -> None:
    """Refuse an output folder that is empty (an unset variable) or a chained fsspec URL."""
    if not str(output).strip().rstrip("/"):
        raise UEDatasetsError("the output is empty (an unset variable?); give an output folder")
    if "::" in str(output):
        raise UEDatasetsError(f"{output}: chained fsspec URLs (a::b) are not accepted as outputs; "
                              "give the URL of the filesystem that holds the output")


def check_dataset_output(src: str, dst: str) -> None:
    """Refuse a dataset directory output that is, holds, or lies inside its input directory."""
    check_output_name(dst)
    a, b = locate(src), locate(dst)
    if same(a, b):
        raise UEDatasetsError(f"{dst}: is the input dataset {src}; choose another output directory")
    if inside(b, a):
        raise UEDatasetsError(f"{dst}: lies inside the input dataset {src}; choose a directory outside it")
    if inside(a, b):
        raise UEDatasetsError(f"{dst}: holds the input dataset {src}; choose a directory that does not contain it")
