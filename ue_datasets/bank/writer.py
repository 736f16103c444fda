"""`BankWriter`: writes a noise bank, streaming entries into shards, then its index and manifest."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UEDatasetsError
from .format import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    DEFAULT_SHARD_BYTES,
    INDEX,
    SHARD_HEADER_BYTES,
    SHARD_NAME,
    SHARD_OVERHEAD,
    as_checksums,
    canonical_json,
    prepare_directory,
    sha256_file,
    signed_hashes,
    write_manifest,
)
from .reader import Bank

_KEYS_SCRATCH = ".keys.partial"


def _check_levels(t: Any, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UEDatasetsError(f"{what}: levels must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise UEDatasetsError(f"{what}: levels must be int8 grey levels, got {t.dtype}")
    if t.dim() != 3 or not 1 <= t.shape[0] <= 3 or t.shape[1] < 1 or t.shape[2] < 1:
        raise UEDatasetsError(f"{what}: levels must have shape (C, H, W) with C in 1..3, got {tuple(t.shape)}")
    if max(t.shape) >= 2**31:
        raise UEDatasetsError(f"{what}: levels of shape {tuple(t.shape)} are too large")
    return t


class _Column:
    """A growable numpy array of rows of one dtype and trailing shape (the writer's index)."""

    def __init__(self, dtype: Any, trailing: tuple[int, ...] = ()):
        self.data = np.empty((1024, *trailing), dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            grown = np.empty((max(need, 2 * len(self.data)), *self.data.shape[1:]), dtype=self.data.dtype)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n: need] = values
        self.n = need

    def array(self) -> np.ndarray:
        return self.data[: self.n]


class _ShardOut:
    """One shard file being written: a reserved header, then the data streamed, then the header."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "xb", buffering=1 << 20)  # noqa: SIM115 (closed by finish/discard)
        self.file.write(b"\0" * SHARD_OVERHEAD)
        self.elements = 0
        self.entries = 0

    def write(self, data: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.elements += data.size

    def finish(self) -> dict[str, Any]:
        header = canonical_json({"levels": {"dtype": "I8", "shape": [self.elements],
                                             "data_offsets": [0, self.elements]}}).encode()
        self.file.seek(0)
        self.file.write(struct.pack("<Q", SHARD_HEADER_BYTES) + header.ljust(SHARD_HEADER_BYTES, b" "))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"file": self.path.name, "entries": self.entries, "bytes": SHARD_OVERHEAD + self.elements,
                "sha256": sha256_file(self.path)}

    def discard(self) -> None:
        self.file.close()


class BankWriter:
    """Writes a noise bank, streaming entries to disk as they come.

    Memory stays bounded by the batch being added plus the index (48 bytes per entry, twice that while
    `close` sorts it). The keys go to a scratch file, read back only to name duplicates.

    Args:
        directory: created (with its parents); one that exists and is not empty is refused.
        shard_bytes: the most bytes a shard file may hold; a new shard starts when the next entry
            would exceed it (an entry larger than that gets a shard of its own).

    Use as a context manager: on success the bank is closed (`close`); on an exception everything
    the writer created is removed and no manifest is written, so an incomplete bank is never openable.

    Example:
        >>> with BankWriter(directory) as w:  # doctest: +SKIP
        ...     w.add_batch(keys, pixel_checksum(x), levels)
        >>> bank = Bank.open(directory)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, shard_bytes: int = DEFAULT_SHARD_BYTES):
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise UEDatasetsError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        self.directory = Path(directory)
        self.shard_bytes = int(shard_bytes)
        self._created_dir = prepare_directory(self.directory)
        self._created: list[Path] = []
        self._shards: list[dict[str, Any]] = []
        self._current: _ShardOut | None = None
        self._hashes = _Column(np.int64)
        self._shard = _Column(np.int32)
        self._offset = _Column(np.int64)
        self._shape = _Column(np.int32, (3,))
        self._checksum = _Column(np.int64, (2,))
        self._state = "open"
        try:
            self._keys_path = self.directory / _KEYS_SCRATCH
            self._keys = open(self._keys_path, "xb", buffering=1 << 20)  # noqa: SIM115 (closed in close/abort)
            self._created.append(self._keys_path)
        except OSError as e:
            self.abort()
            raise UEDatasetsError(f"{self.directory}: cannot write a bank there ({e})") from None

    @property
    def entries(self) -> int:
        """Entries added so far."""
        return self._hashes.n

    def add(self, key: str, checksum: Any, levels: torch.Tensor) -> None:
        """Add one entry.

        Args:
            key: the sample's key.
            checksum: ``(int, int)`` or an int64 tensor ``(2,)``: `pixel_checksum` of the sample's pixels.
            levels: int8 ``(C, H, W)``, C in 1..3: the noise in grey levels.
        """
        arr = checksum.detach().to("cpu") if isinstance(checksum, torch.Tensor) else np.asarray(checksum)
        if tuple(arr.shape) != (2,):
            raise UEDatasetsError(f"entry {key!r}: checksum must be two integers (int64 (2,)), "
                                  f"got shape {tuple(arr.shape)}")
        self.add_batch([key], arr.reshape(1, 2), [levels])

    def add_batch(self, keys: Sequence[str], checksums: torch.Tensor,
                  levels: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Add B entries.

        Args:
            keys: B keys.
            checksums: int64 ``(B, 2)``.
            levels: int8 ``(B, C, H, W)``, or B int8 tensors ``(C, H, W)`` of any shapes (C in 1..3).
        """
        if self._state != "open":
            raise UEDatasetsError(f"{self.directory}: the bank writer is {self._state}")
        keys = [str(k) for k in keys]
        n = len(keys)
        sums = as_checksums(checksums, n)
        if isinstance(levels, torch.Tensor):
            if levels.dtype != torch.int8 or levels.dim() != 4 or levels.shape[0] != n:
                raise UEDatasetsError(f"levels must be int8 ({n}, C, H, W), got {levels.dtype} {tuple(levels.shape)}")
            if n:
                _check_levels(levels[0], f"entry {keys[0]!r}")
            arr = levels.detach().to("cpu").contiguous().numpy()
            shapes = np.tile(np.array(arr.shape[1:], dtype=np.int32), (n, 1))
            parts: list[np.ndarray] | np.ndarray = arr.reshape(n, -1)
        else:
            levels = list(levels)
            if len(levels) != n:
                raise UEDatasetsError(f"got {n} keys but {len(levels)} levels")
            parts = [_check_levels(t, f"entry {k!r}").detach().to("cpu").contiguous().numpy().reshape(-1)
                     for k, t in zip(keys, levels)]
            shapes = np.array([p.shape for p in levels], dtype=np.int32).reshape(n, 3)
        if n == 0:
            return
        try:
            self._write_keys(keys)
            shard_ids, offsets = self._write_levels(parts, shapes.prod(1, dtype=np.int64))
        except OSError as e:
            self.abort()
            raise UEDatasetsError(f"{self.directory}: cannot write the bank ({e}); nothing of it is kept") from None
        self._hashes.extend(signed_hashes(keys))
        self._shard.extend(shard_ids)
        self._offset.extend(offsets)
        self._shape.extend(shapes)
        self._checksum.extend(sums)

    def _write_keys(self, keys: list[str]) -> None:
        data = [k.encode() for k in keys]
        self._keys.write(struct.pack("<Q", len(data)))
        self._keys.write(np.array([len(d) for d in data], dtype="<u8").tobytes())
        self._keys.write(b"".join(data))

    def _write_levels(self, parts: list[np.ndarray] | np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append entries of ``sizes`` elements to the shards; their shard numbers and offsets."""
        n = len(sizes)
        shard_ids = np.empty(n, dtype=np.int32)
        offsets = np.empty(n, dtype=np.int64)
        i = 0
        while i < n:
            cur = self._current
            room = self.shard_bytes - SHARD_OVERHEAD - (cur.elements if cur else 0)
            cum = np.cumsum(sizes[i:])
            k = int(np.searchsorted(cum, room, side="right"))
            if cur is not None and k == 0 and cur.entries:
                self._finish_shard()
                continue
            if cur is None:
                cur = self._new_shard()
                continue
            k = max(k, 1)  # an entry larger than a shard: a shard of its own
            shard_ids[i: i + k] = len(self._shards)
            offsets[i: i + k] = cur.elements + np.concatenate(([0], cum[: k - 1]))
            if isinstance(parts, np.ndarray):
                cur.write(parts[i: i + k])
            else:
                for p in parts[i: i + k]:
                    cur.write(p)
            cur.entries += k
            i += k
        return shard_ids, offsets

    def _new_shard(self) -> _ShardOut:
        path = self.directory / SHARD_NAME.format(len(self._shards))
        self._current = _ShardOut(path)
        self._created.append(path)
        return self._current

    def _finish_shard(self) -> None:
        if self._current is not None:
            self._shards.append(self._current.finish())
            self._current = None

    def close(self) -> Bank:
        """Finish the last shard, write the index, then the manifest (atomically, last); the opened bank.

        Raises:
            UEDatasetsError: two entries with the same key and the same checksum (naming the key); or
                the files cannot be written. Either way nothing of the bank is left.
        """
        if self._state == "closed":
            return Bank.open(self.directory)
        if self._state != "open":
            raise UEDatasetsError(f"{self.directory}: the bank writer is {self._state}")
        from safetensors.torch import save_file

        try:
            self._finish_shard()
            self._keys.close()
            hashes = self._hashes.array()
            order = np.argsort(hashes, kind="stable")
            index = {"hashes": hashes[order], "shard": self._shard.array()[order],
                     "offset": self._offset.array()[order], "shape": self._shape.array()[order],
                     "checksum": self._checksum.array()[order]}
            del hashes
            self._check_duplicates(index, order)
            del order
            path = self.directory / INDEX
            self._created.append(path)
            save_file({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in index.items()}, str(path))
            del index
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            manifest = {
                "format": BANK_FORMAT,
                "format_version": BANK_FORMAT_VERSION,
                "entries": self.entries,
                "dtype": "int8",
                "shard_bytes": self.shard_bytes,
                "index": {"file": INDEX, "sha256": sha256_file(path), "bytes": path.stat().st_size},
                "shards": self._shards,
            }
            write_manifest(self.directory, manifest, self._created)
            self._keys_path.unlink()
            self._created.remove(self._keys_path)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise UEDatasetsError(f"{self.directory}: cannot write the bank ({e}); nothing of it is kept") from None
            raise
        self._state = "closed"
        return Bank.open(self.directory)

    def _check_duplicates(self, index: dict[str, np.ndarray], order: np.ndarray) -> None:
        h = index["hashes"]
        same_key = np.flatnonzero(h[1:] == h[:-1]) if len(h) > 1 else np.zeros(0, dtype=np.int64)
        if not len(same_key):
            return
        # Rows that share a key with another row; among them, sort by (hash, checksum).
        rows = np.unique(np.concatenate([same_key, same_key + 1]))
        cs = index["checksum"][rows]
        by = np.lexsort((cs[:, 1], cs[:, 0], h[rows]))
        r, c = rows[by], cs[by]
        dup = np.flatnonzero((h[r[1:]] == h[r[:-1]]) & (c[1:] == c[:-1]).all(1))
        if not len(dup):
            return
        first, second = sorted((int(order[r[dup[0]]]), int(order[r[dup[0] + 1]])))
        key = self._key_at(first)
        raise UEDatasetsError(
            f"{self.directory}: key {key!r} was added twice with the same pixel checksum "
            f"(entries {first} and {second}, {len(dup)} such pair(s) in all); nothing of the bank is kept")

    def _key_at(self, position: int) -> str:
        """The key of the entry added at ``position``, read back from the scratch file."""
        with open(self._keys_path, "rb") as f:
            seen = 0
            while head := f.read(8):
                (n,) = struct.unpack("<Q", head)
                lengths = np.frombuffer(f.read(8 * n), dtype="<u8").astype(np.int64)
                total = int(lengths.sum())
                if position < seen + n:
                    data = f.read(total)
                    ends = np.cumsum(lengths)
                    j = position - seen
                    return data[int(ends[j] - lengths[j]): int(ends[j])].decode()
                f.seek(total, os.SEEK_CUR)
                seen += n
        return f"<entry {position}>"

    def abort(self) -> None:
        """Remove everything the writer created (files, and the directory if it made it); no bank is left."""
        if self._state == "aborted":
            return
        self._state = "aborted"
        if self._current is not None:
            self._current.discard()
            self._current = None
        keys = getattr(self, "_keys", None)
        if keys is not None:
            keys.close()
        for path in reversed(self._created):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._created.clear()
        if self._created_dir:
            try:
                self.directory.rmdir()
            except OSError:
                pass

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
