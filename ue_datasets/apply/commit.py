"""The commit protocol every rewriter writes through: one writer per output, content-checked completion.

For an output ``dir/NAME``:

1. **claim** ``dir/NAME.lock`` (`OutputLock`): on a local disk an ``flock`` on it, released by the
   kernel when its process dies, so a second run (or an orphaned worker of a killed one) can never
   write the same file; elsewhere (object stores) a marker file checked by reading it back: best
   effort, since an object store has no atomic exclusive create here.
2. **write** into ``dir/NAME.partial-<pid>-<random>``, a name no other writer uses, hashing the
   bytes as they are written (`write_hashed`).
3. **commit**: the stats file (with the output's size and sha256) is written first, then the partial
   file is renamed to ``NAME``. A completed output is one whose file exists and has the size and hash
   its stats record (`checks_out`, which re-reads it: about 1 GB/s); anything else is redone.

Only names of exactly these forms are ever removed (and, for a dataset directory, the files its previous
stats list), and a ``NAME.lock`` that is not a lock of ours is refused, not truncated.

Stats name files relative to the output folder, so a published stats file does not reveal the
protector's file system.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import re
import secrets
import socket
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import OutputError, SourceError, UEDatasetsError

LOCK_SUFFIX = ".lock"
PARTIAL_INFIX = ".partial-"
_PARTIAL_TAIL = r"[0-9]+-[0-9a-f]{8}"
#: Read size when hashing a file.
CHUNK = 1 << 22


class OutputBusy(UEDatasetsError):
    """Another writer holds an output's lock.

    Attributes:
        url: the output. holder: what the lock file says of its holder (pid, host), or ``""``.
        waitable: whether the holder is known to be alive, so waiting for it makes sense (a local lock).
    """

    def __init__(self, url: str, holder: str, waitable: bool):
        self.url, self.holder, self.waitable = url, holder, waitable
        who = f" ({holder})" if holder else ""
        super().__init__(f"{url}: another run is writing it{who}")

    def __reduce__(self):
        return (OutputBusy, (self.url, self.holder, self.waitable))


def stats_url(out_url: str) -> str:
    """``dir/NAME.tar`` -> ``dir/NAME_stats.json`` (likewise ``.parquet``)."""
    head, base = posixpath.split(out_url)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return posixpath.join(head, stem + "_stats.json") if head else stem + "_stats.json"


def partial_url(url: str) -> str:
    """A name for ``url``'s partial file that no other writer uses: ``URL.partial-PID-8HEX``."""
    return f"{url}{PARTIAL_INFIX}{os.getpid()}-{secrets.token_hex(4)}"


def is_partial_of(name: str, base: str) -> bool:
    """Whether file name ``name`` is a partial file of output ``base``, exactly as `partial_url` names them."""
    return re.fullmatch(re.escape(base + PARTIAL_INFIX) + _PARTIAL_TAIL, name) is not None


def final_url(url: str) -> str:
    """The output a partial file is written for (``url`` itself when it is not a partial name)."""
    head, sep, tail = url.rpartition(PARTIAL_INFIX)
    return head if sep and re.fullmatch(_PARTIAL_TAIL, tail) else url


def output_error(url: str, e: OSError) -> OutputError:
    """A one-line error naming ``url`` for an OS error while writing it."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    hint = {errno.ENOSPC: "; free some space and rerun to resume", errno.EROFS: "; choose a writable output",
            errno.EACCES: "; choose a writable output", errno.EPERM: "; choose a writable output"}.get(e.errno, "")
    return OutputError(url, f"cannot write ({reason}){hint}")


class _Hashing:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f: Any):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False


def write_hashed(url: str, write: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``write(fileobj)`` into ``url`` (a partial name), returning its result and ``{bytes, sha256}``.

    The file is removed when ``write`` fails. OS errors on the output become `OutputError` naming the
    output the partial file is for.
    """
    fs, path = fsspec.core.url_to_fs(url)
    try:
        try:
            with fs.open(path, "wb") as f:
                hashed = _Hashing(f)
                result = write(hashed)
        except OSError as e:
            raise output_error(final_url(url), e) from None
    except BaseException:
        discard(url)
        raise
    return result, {"bytes": hashed.size, "sha256": hashed.sha256.hexdigest()}


def discard(url: str) -> None:
    """Remove a partial file or folder this run wrote (nothing when it is not there)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.rm(path, recursive=True)
    except OSError:
        pass


def write_json(url: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON at ``url``, atomically (own partial name, then rename)."""
    data = (json.dumps(payload, indent=2) + "\n").encode()
    partial = partial_url(url)
    write_hashed(partial, lambda f: f.write(data))
    rename(partial, url)


def rename(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` (replacing it), an `OutputError` on failure."""
    fs, a = fsspec.core.url_to_fs(src)
    b = fsspec.core.url_to_fs(dst)[1]
    try:
        if isinstance(fs, LocalFileSystem):
            os.replace(a, b)
        else:
            fs.mv(a, b)
    except OSError as e:
        raise output_error(final_url(dst), e) from None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON object at ``url``, or ``None`` when it is missing or not a JSON object."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return _json_object(f.read())
    except OSError:  # missing, a folder, below a file
        return None


def file_digest(url: str) -> dict[str, Any] | None:
    """``{bytes, sha256}`` of the file at ``url``, or ``None`` when there is none."""
    fs, path = fsspec.core.url_to_fs(url)
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
    except OSError:  # missing, a folder, unreadable: it does not check out
        return None
    return {"bytes": size, "sha256": h.hexdigest()}


def _modified(info: dict[str, Any]) -> str | None:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified", info.get("created"))))
    return None if value is None else str(value)


def source_identity(url: str) -> dict[str, Any]:
    """What a rerun compares to tell that an input is unchanged: a file's size and modification time,
    or a digest of a folder's listing (relative names, sizes and times).

    Raises:
        SourceError: the input cannot be found or read.
    """
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return _identity(fs, path)
    except OSError as e:
        raise SourceError(url, f"cannot open ({type(e).__name__}: {e})") from None


def _identity(fs: Any, path: str) -> dict[str, Any]:
    if fs.isdir(path):
        listing = sorted((posixpath.relpath(p, path), info.get("size"), _modified(info))
                         for p, info in fs.find(path, detail=True).items())
        return {"listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    info = fs.info(path)
    return {"bytes": info.get("size"), "modified": _modified(info)}


def checks_out(url: str, recorded: dict[str, Any] | None) -> bool:
    """Whether the file at ``url`` has the size and sha256 in ``recorded``."""
    if not recorded or "sha256" not in recorded or "bytes" not in recorded:
        return False
    fs, path = fsspec.core.url_to_fs(url)
    try:
        if fs.size(path) != recorded["bytes"]:
            return False
    except (FileNotFoundError, OSError):
        return False
    return file_digest(url) == {"bytes": recorded["bytes"], "sha256": recorded["sha256"]}


class OutputLock:
    """One writer per output: ``claim`` raises `OutputBusy` while another process holds it.

    On a local disk this is ``flock`` on ``OUTPUT.lock`` (exact, and released by the kernel when the
    holder dies, however it dies); on other filesystems a marker file checked by reading it back (best
    effort: two writers racing can both pass; a killed run leaves it, and the error says to remove it).
    """

    def __init__(self, url: str):
        self.url = str(url)
        self.lock_url = self.url.rstrip("/") + LOCK_SUFFIX
        self.fs, self.path = fsspec.core.url_to_fs(self.lock_url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._fd: int | None = None
        self._token = ""

    def _holder_text(self, info: dict[str, Any] | None) -> str:
        if not info:
            return ""
        return f"pid {info.get('pid')} on {info.get('host')}"

    def claim(self) -> OutputLock:
        """Take the lock, or raise `OutputBusy`."""
        self._token = secrets.token_hex(8)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token}
        try:
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise output_error(self.url, e) from None
        if self.local:
            import fcntl

            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as e:
                    raise output_error(self.url, e) from None
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise OutputBusy(self.url, self._holder_text(read_json(self.lock_url)), waitable=True) from None
                    try:
                        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same_file = False
                    if same_file:  # else its holder removed it between our open and flock: take the new one
                        before = os.pread(fd, 4096, 0)
                        if before and "token" not in (_json_object(before) or {}):
                            raise UEDatasetsError(f"{self.lock_url}: exists and is not a ue-datasets lock file; "
                                                  "move it away or choose another output folder")
                        os.ftruncate(fd, 0)
                        os.write(fd, json.dumps(info).encode())
                except BaseException as e:
                    os.close(fd)
                    if isinstance(e, OSError) and not isinstance(e, UEDatasetsError):
                        raise output_error(self.url, e) from None
                    raise
                if same_file:
                    break
                os.close(fd)
            self._fd = fd
            return self
        if self.fs.exists(self.path):
            held = read_json(self.lock_url)
            raise OutputBusy(self.url, f"{self._holder_text(held)}; if no run is writing it, remove {self.lock_url}",
                             waitable=False)
        try:
            with self.fs.open(self.path, "wb") as f:
                f.write(json.dumps(info).encode())
        except OSError as e:
            raise output_error(self.url, e) from None
        if (read_json(self.lock_url) or {}).get("token") != self._token:
            raise OutputBusy(self.url, "", waitable=False)
        self._fd = -1
        return self

    def held(self) -> bool:
        """Whether this object holds the lock now, and the lock file is still the one it locked."""
        if self._fd is None:
            return False
        if self.local:
            try:
                return os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                return False
        return (read_json(self.lock_url) or {}).get("token") == self._token

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        if self._fd is None:
            return
        try:
            if self.held():
                self.fs.rm(self.path)
        except (FileNotFoundError, OSError):
            pass
        if self.local:
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.claim()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_partials(*urls: str) -> None:
    """Remove partial files of ``urls`` left by killed runs (called while holding their output's lock).

    Only names exactly of `partial_url`'s form are removed.
    """
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url)
        head, base = posixpath.split(path)
        try:
            names = fs.ls(head or ".", detail=False)
        except OSError:
            continue
        for name in names:
            if is_partial_of(posixpath.basename(name), base):
                try:
                    fs.rm(name, recursive=True)
                except OSError:
                    pass
