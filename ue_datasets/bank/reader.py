"""`Bank`: a noise bank opened memory-mapped, its entries found by key and pixel checksum."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, UEDatasetsError
from .format import (
    INDEX,
    INDEX_TENSORS,
    as_checksums,
    canonical_json,
    map_file,
    prepare_directory,
    read_bank_manifest,
    read_header,
    sha256_file,
    signed_hashes,
    tensor_view,
    write_manifest,
)


class Bank:
    """A noise bank opened memory-mapped: int8 grey levels per sample, found by key and pixel checksum.

    Open with `Bank.open` (or get one from `BankWriter.close`). Lookups are thread-safe; a bank
    pickles as its directory and is reopened on the other side (spawned DataLoader or process-pool
    workers), never with its maps.

    Attributes:
        directory: the bank's directory.
        entries: number of entries (also ``len(bank)``).
        digest: ``sha256:<hex>`` of the canonical manifest JSON (which holds every file's sha256).
    """

    directory: Path
    entries: int
    digest: str

    def __init__(self, directory: Path, manifest: dict[str, Any], index: dict[str, np.ndarray]):
        self.directory = directory
        self.manifest = manifest
        self.entries = int(manifest["entries"])
        self.digest = "sha256:" + hashlib.sha256(canonical_json(manifest).encode()).hexdigest()
        self._index = index
        self._hashes = index["hashes"]
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Bank:
        """Open a bank: read its manifest, map its index; shards are mapped on first use.

        Reads the manifest and the index's header only (not the shards, not the index's data), so its
        cost does not grow with the bank. Files are not hashed: `verify` does that.

        Raises:
            ArtifactError: see `read_bank_manifest`; a missing index or shard file; an index whose
                size or tensors differ from the manifest. The message names the path.
        """
        directory = Path(directory)
        manifest = read_bank_manifest(directory)
        for s in manifest["shards"]:
            p = directory / s["file"]
            if not p.is_file():
                raise ArtifactError(f"{p}: missing shard file of the bank")
        path = directory / manifest["index"]["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing index file of the bank") from None
        if size != manifest["index"]["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, the manifest says {manifest['index']['bytes']} "
                                "(truncated or modified)")
        start, header = read_header(path, size)
        raw = map_file(path) if size > start else None
        n = manifest["entries"]
        index = {name: tensor_view(path, raw, start, size, header, name, st, dt, (n, *trailing))
                 for name, (st, dt, trailing) in INDEX_TENSORS.items()}
        return cls(directory, manifest, index)

    def __len__(self) -> int:
        return self.entries

    def __repr__(self) -> str:
        return f"Bank({str(self.directory)!r}, entries={self.entries}, shards={len(self.manifest['shards'])})"

    def __reduce__(self):
        return (Bank.open, (str(self.directory),))

    def find(self, keys: Sequence[str], checksums: torch.Tensor) -> torch.Tensor:
        """The row of each sample's entry: same key and same pixel checksum, else -1.

        Args:
            keys: B sample keys.
            checksums: int64 ``(B, 2)``, `pixel_checksum` of the samples' pixels.

        Returns:
            int64 ``(B,)``: rows for `levels` and `shape`, -1 where no entry matches.
        """
        keys = [str(k) for k in keys]
        b = len(keys)
        sums = as_checksums(checksums, b)
        out = np.full(b, -1, dtype=np.int64)
        if b == 0 or self.entries == 0:
            return torch.from_numpy(out)
        q = signed_hashes(keys)
        lo = np.searchsorted(self._hashes, q, side="left")
        hi = np.searchsorted(self._hashes, q, side="right")
        counts = hi - lo
        total = int(counts.sum())
        if total:
            which = np.repeat(np.arange(b), counts)
            starts = np.repeat(lo - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
            rows = starts + np.arange(total)
            match = (self._index["checksum"][rows] == sums[which]).all(1)
            out[which[match][::-1]] = rows[match][::-1]  # the first matching row wins
        return torch.from_numpy(out)

    def _rows(self, rows: Sequence[int] | torch.Tensor) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            arr = rows.detach().to("cpu").numpy()
        else:
            arr = np.asarray(rows)
        arr = arr.reshape(-1)
        if arr.size and arr.dtype.kind not in "iu":
            raise UEDatasetsError(f"rows must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
        bad = (arr < 0) | (arr >= self.entries)
        if bad.any():
            raise UEDatasetsError(f"{self.directory}: row {int(arr[bad][0])} is not an entry of the bank "
                                  f"(0..{self.entries - 1}; find returns -1 for samples it has no entry for)")
        return arr

    def _shard_map(self, i: int) -> np.ndarray:
        mm = self._maps.get(i)
        if mm is not None:
            return mm
        with self._lock:
            mm = self._maps.get(i)
            if mm is None:
                shards = self.manifest["shards"]
                if not 0 <= i < len(shards):
                    raise ArtifactError(f"{self.directory / INDEX}: names shard {i}, the bank has {len(shards)}")
                info = shards[i]
                path = self.directory / info["file"]
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    raise ArtifactError(f"{path}: missing shard file of the bank") from None
                if size != info["bytes"]:
                    raise ArtifactError(f"{path}: {size} bytes, the manifest says {info['bytes']} "
                                        "(truncated or modified)")
                start, header = read_header(path, size)
                raw = map_file(path) if size > start else None
                mm = tensor_view(path, raw, start, size, header, "levels", "I8", np.int8, None)
                self._maps[i] = mm
        return mm

    def levels(self, rows: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The entries at ``rows``: int8 ``(C, H, W)`` tensors, copies out of the mapped shards."""
        arr = self._rows(rows)
        shard = self._index["shard"][arr]
        offset = self._index["offset"][arr]
        shape = self._index["shape"][arr]
        out = []
        for s, o, (c, h, w) in zip(shard.tolist(), offset.tolist(), shape.tolist()):
            mm = self._shard_map(s)
            n = c * h * w
            if o < 0 or o + n > len(mm) or n <= 0:
                raise ArtifactError(f"{self.directory / INDEX}: an entry lies outside "
                                    f"{self.manifest['shards'][s]['file']} (corrupted index)")
            out.append(torch.from_numpy(mm[o: o + n].reshape(c, h, w).copy()))
        return out

    def shape(self, row: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the entry at ``row``."""
        (r,) = self._rows([row])
        c, h, w = self._index["shape"][r].tolist()
        return (c, h, w)

    def verify(self) -> None:
        """Re-hash the index and every shard against the manifest (reads the whole bank).

        Raises:
            ArtifactError: naming the first file that is missing or whose size or sha256 differs.
        """
        for info in [self.manifest["index"], *self.manifest["shards"]]:
            path = self.directory / info["file"]
            try:
                size = path.stat().st_size
                digest = sha256_file(path) if size == info["bytes"] else None
            except FileNotFoundError:
                raise ArtifactError(f"{path}: missing file of the bank") from None
            except OSError as e:
                raise ArtifactError(f"{path}: unreadable ({e})") from None
            if digest is None:
                raise ArtifactError(f"{path}: {size} bytes, the manifest says {info['bytes']} (truncated or modified)")
            if digest != info["sha256"]:
                raise ArtifactError(f"{path}: sha256 {digest} differs from the manifest's {info['sha256']} "
                                    "(modified or corrupted)")

    def copy_to(self, directory: str | os.PathLike) -> Bank:
        """Copy the bank into ``directory`` (new, or empty) and open the copy (same digest).

        Files are hard-linked where the filesystem allows (same filesystem), else copied; banks are
        never modified in place, so linked copies share bytes safely. The manifest is written last.

        Raises:
            UEDatasetsError: ``directory`` exists and is not empty (it is left untouched), or cannot be written.
        """
        out = Path(directory)
        created_dir = prepare_directory(out)
        created: list[Path] = []
        try:
            for info in [self.manifest["index"], *self.manifest["shards"]]:
                src, dst = self.directory / info["file"], out / info["file"]
                created.append(dst)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            write_manifest(out, self.manifest, created)
        except BaseException as e:
            for p in reversed(created):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            if created_dir:
                try:
                    out.rmdir()
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise UEDatasetsError(f"{out}: cannot copy the bank there ({e}); nothing of it is kept") from None
            raise
        return Bank.open(out)
