"""The noise bank's format on disk: its names and constants, the manifest (read, checked, written
atomically), and the safetensors files parsed and memory-mapped; helpers the writer and the reader share.

The format itself is described in `ue_datasets.bank`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArtifactError, UEDatasetsError
from ..kernels.samples import key_hashes

BANK_FORMAT = "ue-datasets-bank"
BANK_FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 256 << 20

MANIFEST = "manifest.json"
INDEX = "index.safetensors"
SHARD_NAME = "deltas-{:05d}.safetensors"
#: Bytes reserved for a shard's JSON header (a multiple of 8, so that the data starts 8-byte aligned);
#: the header of a 1-D int8 tensor of up to 10**19 elements takes under 100.
SHARD_HEADER_BYTES = 128
#: Bytes of a shard file before its data: the 8-byte header length and the header.
SHARD_OVERHEAD = 8 + SHARD_HEADER_BYTES
#: The index's tensors: name -> (safetensors dtype, numpy dtype, trailing shape).
INDEX_TENSORS = {
    "hashes": ("I64", np.int64, ()),
    "shard": ("I32", np.int32, ()),
    "offset": ("I64", np.int64, ()),
    "shape": ("I32", np.int32, (3,)),
    "checksum": ("I64", np.int64, (2,)),
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASH_CHUNK = 4 << 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def signed_hashes(keys: Sequence[str]) -> np.ndarray:
    """int64 ``(B,)``: `key_hashes` read as signed 64-bit integers (the index's order)."""
    return np.array(key_hashes(keys), dtype=np.uint64).view(np.int64)


def as_checksums(checksums: Any, n: int) -> np.ndarray:
    """int64 ``(n, 2)`` numpy array of checksums given as a tensor, an array or a sequence of pairs."""
    if isinstance(checksums, torch.Tensor):
        if checksums.is_floating_point() or checksums.is_complex():
            raise UEDatasetsError(f"checksums must be int64, got {checksums.dtype}")
        arr = checksums.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(checksums)
        if arr.size and arr.dtype.kind not in "iu":
            raise UEDatasetsError(f"checksums must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
    if arr.size == 0 and n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.shape != (n, 2):
        raise UEDatasetsError(f"checksums must have shape ({n}, 2) (int64, pixel_checksum), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _safe_name(name: Any, path: Path) -> str:
    """A manifest's file name, refused unless it is a plain name inside the bank's directory."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name == MANIFEST:
        raise ArtifactError(f"{path}: invalid file name {name!r} in the manifest")
    return name


def read_header(path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """The offset where a safetensors file's data starts and its parsed JSON header.

    Args:
        path: the file; only its first ``8 + header length`` bytes are read.
        size: its size in bytes (already known from ``os.stat``).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ArtifactError(f"{path}: truncated or corrupted safetensors header (declares {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable safetensors header ({e})") from None
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: unreadable safetensors header")
    return 8 + n, header


def map_file(path: Path) -> np.ndarray:
    """The whole file memory-mapped read-only, as a plain uint8 ndarray (nothing is read until used)."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot be mapped ({e})") from None


def tensor_view(path: Path, raw: np.ndarray | None, start: int, size: int, header: dict[str, Any], name: str,
                 dtype: str, np_dtype: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """A read-only view of tensor ``name`` of a safetensors file, inside the file's map ``raw``.

    Args:
        raw: `map_file` of the file (``None`` if it is empty); start: where its data starts
            (`read_header`); size: its size in bytes.
        shape: the expected shape, ``None`` for any 1-D shape.
    """
    info = header.get(name)
    if not isinstance(info, dict) or info.get("dtype") != dtype:
        raise ArtifactError(f"{path}: no {dtype} tensor {name!r}")
    got = info.get("shape")
    offsets = info.get("data_offsets")
    if (not isinstance(got, list) or not all(isinstance(v, int) and v >= 0 for v in got)
            or (shape is None and len(got) != 1) or (shape is not None and tuple(got) != shape)):
        raise ArtifactError(f"{path}: tensor {name!r} has shape {got}, expected {list(shape) if shape else '(n,)'}")
    itemsize = np.dtype(np_dtype).itemsize
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(v, int) for v in offsets)
            or offsets[1] - offsets[0] != int(np.prod(got)) * itemsize or offsets[0] < 0
            or start + offsets[1] > size):
        raise ArtifactError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupted)")
    if offsets[1] == offsets[0] or raw is None:
        return np.zeros(tuple(got), dtype=np_dtype)
    return raw[start + offsets[0]: start + offsets[1]].view(np_dtype).reshape(got)


def prepare_directory(directory: Path) -> bool:
    """Make ``directory`` ready to receive a bank; whether it was created (refused if not empty)."""
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise UEDatasetsError(f"{directory}: exists and is not a directory; choose another place for the bank")
        if any(directory.iterdir()):
            raise UEDatasetsError(f"{directory}: exists and is not empty; nothing in it is touched: "
                                  "choose a new or empty directory for the bank")
        return False
    try:
        directory.mkdir(parents=True)
    except OSError as e:
        raise UEDatasetsError(f"{directory}: cannot create the bank directory ({e})") from None
    return True


def write_manifest(directory: Path, manifest: dict[str, Any], created: list[Path]) -> None:
    """Write ``manifest.json`` atomically (a temporary name, fsynced, then ``os.replace``)."""
    tmp = directory / f".{MANIFEST}.partial"
    created.append(tmp)
    with open(tmp, "x") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    created[created.index(tmp)] = directory / MANIFEST


def read_bank_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a bank's manifest (no other file is read).

    Raises:
        ArtifactError: no such directory, no manifest (an incomplete bank), another format, a newer
            format version, or a malformed manifest; the message names the path.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if not directory.is_dir():
            raise ArtifactError(f"{directory}: no such bank directory") from None
        raise ArtifactError(f"{directory}: not a noise bank, or an incomplete one (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BANK_FORMAT:
        raise ArtifactError(f"{path}: not a ue-datasets noise bank manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path}: manifest has no integer format_version")
    if version > BANK_FORMAT_VERSION:
        raise ArtifactError(f"{path}: bank format {version} is newer than this ue-datasets reads "
                            f"(format {BANK_FORMAT_VERSION}); upgrade ue-datasets")

    def _int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    index, shards = manifest.get("index"), manifest.get("shards")
    if (not _int(manifest.get("entries")) or manifest.get("dtype") != "int8" or not _int(manifest.get("shard_bytes"))
            or not isinstance(index, dict) or not isinstance(shards, list)):
        raise ArtifactError(f"{path}: malformed bank manifest (entries, dtype, shard_bytes, index, shards)")
    for entry in [index, *shards]:
        if (not isinstance(entry, dict) or not _int(entry.get("bytes")) or not isinstance(entry.get("sha256"), str)
                or (entry is not index and not _int(entry.get("entries")))):
            raise ArtifactError(f"{path}: malformed file entry {entry!r}")
        _safe_name(entry.get("file"), path)
    if sum(s["entries"] for s in shards) != manifest["entries"]:
        raise ArtifactError(f"{path}: the shards' entries do not add up to {manifest['entries']}")
    return manifest
