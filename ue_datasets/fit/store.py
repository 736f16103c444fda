"""An on-disk copy of a labelled source for fits that pass over it many times (EM, SALM).

`build_store` streams the source once (any source `protect` accepts, in source order) and keeps, per
sample: its uint8 pixels at its own size in one flat file (``pixels.u8``, read as a ``numpy.memmap``),
its key, its integer label and its `pixel_checksum`. Channels are as the core sees them: alpha is
dropped, so C is 1 or 3. Every ``part_size`` samples a part file records what was appended
(``part-00000.safetensors``, written atomically after the pixels are synced); a killed pass resumes
after the last complete part, truncating the pixels written after it, without decoding the samples
before it. Later rounds read the memmap and never decode again; nothing per-pixel stays in memory.

Per-sample arrays of the fits (noise states, masks) are memmaps with the same layout (`SampleStore.array`):
the sample's elements in order, at offsets the store computes from the shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..apply.commit import write_json
from ..apply.encoded import batched, shared_pool
from ..apply.images import resize_square
from ..apply.records import Record, colour_image, iter_records
from ..errors import SampleError, UEDatasetsError
from ..kernels.samples import pixel_checksum
from ..progress import progress_bar
from ..version import __version__

STORE_FORMAT = 1
MANIFEST = "store.json"
PIXELS = "pixels.u8"
CHECKPOINT = "checkpoint.json"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (their ``repr``), the same in every process: the fits' shuffles,
    subsets and random masks each get their own."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _label(record: Record, num_classes: int | None) -> int:
    """The record's label as an int in ``[0, num_classes)`` (``[0, inf)`` when not given), else a `SampleError`."""
    raw = record.label
    if isinstance(raw, bool) or not isinstance(raw, (int, np.integer)):
        raise SampleError(record.source, record.key, f"label must be an integer class id, got {raw!r}")
    label = int(raw)
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise SampleError(record.source, record.key, f"label {label} is not a class id {bound}")
    return label


@dataclass
class SampleStore:
    """The stored samples (see the module docstring).

    Attributes:
        directory: where the files are.
        keys: N sample keys, in source order.
        labels: int64 ``(N,)`` in ``[0, num_classes)``.
        checksums: int64 ``(N, 2)`` `pixel_checksum` of each image (C = 1 or 3, own size).
        shapes: int64 ``(N, 3)`` each image's ``(C, H, W)``.
        num_classes: the given number of classes, else ``max(labels) + 1``.
    """

    directory: Path
    keys: list[str]
    labels: torch.Tensor
    checksums: torch.Tensor
    shapes: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def offsets(self) -> np.ndarray:
        """int64 ``(N + 1,)``: where each sample's ``C * H * W`` elements start in a per-sample array."""
        return np.concatenate([[0], np.cumsum(self.shapes.prod(1).numpy())]).astype(np.int64)

    @cached_property
    def plane_offsets(self) -> np.ndarray:
        """int64 ``(N + 1,)``: the same for one-channel ``H * W`` arrays (masks)."""
        return np.concatenate([[0], np.cumsum(self.shapes[:, 1:].prod(1).numpy())]).astype(np.int64)

    @cached_property
    def pixels(self) -> np.memmap:
        """The flat uint8 pixels, read-only."""
        return np.memmap(self.directory / PIXELS, dtype=np.uint8, mode="r", shape=(int(self.offsets[-1]),))

    @cached_property
    def shape_ids(self) -> torch.Tensor:
        """int64 ``(N,)``: samples of equal shape share an id."""
        return torch.unique(self.shapes, dim=0, return_inverse=True)[1]

    @property
    def channels(self) -> int:
        """3 when any image has colour, else 1."""
        return int(self.shapes[:, 0].max())

    def common_size(self) -> tuple[int, int] | None:
        """``(H, W)`` shared by every image, or None."""
        hw = self.shapes[:, 1:]
        return (int(hw[0, 0]), int(hw[0, 1])) if bool((hw == hw[0]).all()) else None

    def array(self, path: Path, dtype: type, planes: bool = False, fresh: bool = False) -> np.memmap:
        """A per-sample array in file ``path`` laid out as the pixels (zeros when new or ``fresh``), writable.

        ``planes``: one element per pixel (``(1, H, W)`` per sample) instead of ``(C, H, W)``.
        """
        size = int((self.plane_offsets if planes else self.offsets)[-1])
        if fresh or not path.exists() or path.stat().st_size != size * np.dtype(dtype).itemsize:
            path.unlink(missing_ok=True)
            return np.memmap(path, dtype=dtype, mode="w+", shape=(size,))
        return np.memmap(path, dtype=dtype, mode="r+", shape=(size,))

    def read(self, array: np.ndarray, idx: torch.Tensor, planes: bool = False) -> torch.Tensor:
        """Samples ``idx`` (all of one shape) of a per-sample array: ``(B, C, H, W)`` (``(B, 1, H, W)`` with
        ``planes``), in the array's dtype, a copy."""
        offsets = self.plane_offsets if planes else self.offsets
        rows = idx.tolist()
        c, h, w = self.shapes[rows[0]].tolist()
        if rows == list(range(rows[0], rows[0] + len(rows))):
            flat = np.array(array[offsets[rows[0]]:offsets[rows[-1] + 1]])
        else:
            flat = np.concatenate([array[offsets[i]:offsets[i + 1]] for i in rows])
        return torch.from_numpy(flat).reshape(len(rows), 1 if planes else c, h, w)

    def write(self, array: np.ndarray, idx: torch.Tensor, values: torch.Tensor, planes: bool = False) -> None:
        """Store ``values`` ``(B, C, H, W)`` (or ``(B, 1, H, W)``) as samples ``idx`` of ``array``."""
        offsets = self.plane_offsets if planes else self.offsets
        rows = idx.tolist()
        flat = values.detach().cpu().reshape(len(rows), -1).numpy()
        if rows == list(range(rows[0], rows[0] + len(rows))):
            array[offsets[rows[0]]:offsets[rows[-1] + 1]] = flat.reshape(-1)
        else:
            for i, v in zip(rows, flat):
                array[offsets[i]:offsets[i + 1]] = v

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` of samples ``idx``, all of one shape."""
        return self.read(self.pixels, idx)

    def resized(self, idx: torch.Tensor, size: int, channels: int) -> torch.Tensor:
        """uint8 ``(B, channels, size, size)``: samples ``idx`` (any shapes) resized with `resize_square`,
        grey images repeated to ``channels``."""
        return torch.stack([resize_square(self.images(torch.tensor([i]))[0], size).expand(channels, -1, -1)
                            for i in idx.tolist()])

    def runs(self, batch_size: int, indices: torch.Tensor | None = None, by_shape: bool = True,
             merge_single: bool = False) -> list[torch.Tensor]:
        """``indices`` (default all, in source order) cut into batches of at most ``batch_size``, in order;
        with ``by_shape`` a change of image shape also ends a batch. ``merge_single``: a last batch of one
        sample (of a shape) joins the batch before it, so that batch norm can train on it."""
        indices = torch.arange(len(self)) if indices is None else indices
        if not len(indices):
            return []
        ids = self.shape_ids[indices] if by_shape else torch.zeros(len(indices), dtype=torch.int64)
        cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
        out: list[torch.Tensor] = []
        for a, b in zip([0, *cuts], [*cuts, len(indices)]):
            chunks = list(indices[a:b].split(batch_size))
            if merge_single and len(chunks) > 1 and len(chunks[-1]) == 1:
                chunks[-2:] = [torch.cat(chunks[-2:])]
            out.extend(chunks)
        return out

    def epoch_batches(self, epoch: int, batch_size: int, seed: int, by_shape: bool) -> list[torch.Tensor]:
        """Training batches of one epoch: a seeded permutation of all samples (grouped by shape with
        ``by_shape``, keeping the permuted order within a shape), cut by `runs` with ``merge_single``,
        the batches in a seeded random order. The same for the same ``(epoch, batch_size, seed)``."""
        g = torch.Generator().manual_seed(derive_seed(seed, epoch))
        perm = torch.randperm(len(self), generator=g)
        if by_shape:
            perm = perm[torch.sort(self.shape_ids[perm], stable=True).indices]
        batches = self.runs(batch_size, perm, by_shape, merge_single=True)
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def stratified(self, fraction: float, seed: int) -> torch.Tensor:
        """int64 indices of a seeded stratified subset: ``max(1, round(fraction * n_c))`` samples of
        each class c present, in source order."""
        g = torch.Generator().manual_seed(seed)
        picked = []
        for c in torch.unique(self.labels).tolist():
            members = torch.nonzero(self.labels == c).flatten()
            take = max(1, round(fraction * len(members)))
            picked.append(members[torch.randperm(len(members), generator=g)[:take]])
        return torch.sort(torch.cat(picked)).values


class TrainStream:
    """The persistent training iterator: `SampleStore.epoch_batches` one epoch after the other; its
    state ``(epoch, position)`` goes into the checkpoint, so a resumed fit draws the same batches."""

    def __init__(self, store: SampleStore, batch_size: int, seed: int, by_shape: bool, epoch: int = 0,
                 position: int = 0):
        self.store, self.batch_size, self.seed, self.by_shape = store, batch_size, seed, by_shape
        self.epoch, self.position = epoch, position
        self._plan = store.epoch_batches(epoch, batch_size, seed, by_shape)

    def next(self) -> torch.Tensor:
        """int64 indices of the next batch."""
        if self.position >= len(self._plan):
            self.epoch, self.position = self.epoch + 1, 0
            self._plan = self.store.epoch_batches(self.epoch, self.batch_size, self.seed, self.by_shape)
        batch = self._plan[self.position]
        self.position += 1
        return batch


def _check_manifest(directory: Path, expected: dict) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [*directory.glob("part-*"), directory / PIXELS]:
            stale.unlink(missing_ok=True)
        write_json(str(path), {**expected, "complete": False})
        return {**expected, "complete": False}
    found = json.loads(path.read_text())
    different = sorted(k for k in expected if k != "ue_datasets_version" and found.get(k) != expected[k])
    if different:
        raise UEDatasetsError(f"{directory}: a sample store of another fit (differs in {', '.join(different)}); "
                              "give another cache directory or delete this one")
    return found


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.safetensors"))


def _write_part(path: Path, keys: Sequence[str], labels: list[int], shapes: list[tuple[int, ...]],
                sums: list[torch.Tensor], start: int, end: int) -> None:
    from safetensors.torch import save_file

    tensors = {"labels": torch.tensor(labels, dtype=torch.int64), "shapes": torch.tensor(shapes, dtype=torch.int64),
               "checksums": torch.cat(sums)}
    tmp = path.with_suffix(".partial")
    save_file(tensors, tmp, metadata={"keys": json.dumps(list(keys)), "start": str(start), "end": str(end)})
    os.replace(tmp, path)


def build_store(src: str, directory: str | os.PathLike, *, image_field: str | None = None,
                label_field: str | None = None, key_field: str | None = None, num_classes: int | None = None,
                limit: int | None = None, batch_size: int = 256, part_size: int = 8192,
                progress: bool = True) -> SampleStore:
    """Copy the labelled samples of ``src`` into a store in ``directory``, resumably (module docstring).

    Args:
        src: shards, a ``save_to_disk`` directory or parquet files.
        directory: where the store goes; a rerun with the same arguments reuses it.
        image_field, label_field, key_field: as for ``protect``.
        num_classes: labels must be below it; default ``max(label) + 1``.
        limit: the first ``limit`` samples only.
        batch_size: images decoded at a time.
        part_size: samples per part file.

    Raises:
        SampleError: an image cannot be decoded, or a label is not an integer in range (names file and key).
        UEDatasetsError: an empty source; a store of another source or settings.
    """
    directory = Path(directory)
    expected = {"format": STORE_FORMAT, "source": src, "image_field": image_field, "label_field": label_field,
                "key_field": key_field, "num_classes": num_classes, "limit": limit, "part_size": part_size,
                "ue_datasets_version": __version__}
    manifest = _check_manifest(directory, expected)
    if manifest["complete"]:
        return load_store(directory, num_classes)
    parts = _parts(directory)
    records = iter_records(src, image_field=image_field, label_field=label_field, key_field=key_field, labels=True)
    end = 0
    for index, part in enumerate(parts):  # complete parts: check their keys, decode nothing
        meta = _part_meta(part)
        stored = json.loads(meta["keys"])
        if [r.key for _, r in zip(stored, records)] != stored:
            raise UEDatasetsError(f"{directory}: part {index} does not match {src} (the source changed?); "
                                  "delete the cache to start over")
        end = int(meta["end"])
    n = len(parts) * part_size
    bar = progress_bar(total=limit, initial=n, desc="samples", unit="img", disable=not progress)
    keys: list[str] = []
    labels: list[int] = []
    shapes: list[tuple[int, ...]] = []
    sums: list[torch.Tensor] = []
    start, index = end, len(parts)
    pool = shared_pool()
    try:
        with open(directory / PIXELS, "ab") as f:
            f.truncate(end)
            for batch in batched(records, batch_size):
                batch = batch[: max(0, limit - n)] if limit is not None else batch
                if not batch:
                    break
                for record, image in zip(batch, pool.map(colour_image, batch)):
                    labels.append(_label(record, num_classes))
                    keys.append(record.key)
                    shapes.append(tuple(image.shape))
                    sums.append(pixel_checksum(image[None]))
                    f.write(image.contiguous().numpy().tobytes())
                    end += image.numel()
                    if len(keys) == part_size:
                        f.flush()
                        os.fsync(f.fileno())
                        _write_part(directory / f"part-{index:05d}.safetensors", keys, labels, shapes, sums, start, end)
                        keys, labels, shapes, sums, start, index = [], [], [], [], end, index + 1
                n += len(batch)
                bar.update(len(batch))
            f.flush()
            os.fsync(f.fileno())
            if keys:
                _write_part(directory / f"part-{index:05d}.safetensors", keys, labels, shapes, sums, start, end)
    finally:
        bar.close()
    if not _parts(directory):
        raise UEDatasetsError(f"{src}: no samples to fit on (is the source empty?)")
    write_json(str(directory / MANIFEST), {**manifest, "complete": True})
    return load_store(directory, num_classes)


def _part_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def load_store(directory: str | os.PathLike, num_classes: int | None = None) -> SampleStore:
    """Open a complete store (`build_store`)."""
    from safetensors import safe_open

    directory = Path(directory)
    keys: list[str] = []
    labels, shapes, sums = [], [], []
    for part in _parts(directory):
        with safe_open(part, framework="pt") as f:
            keys.extend(json.loads(f.metadata()["keys"]))
            labels.append(f.get_tensor("labels"))
            shapes.append(f.get_tensor("shapes"))
            sums.append(f.get_tensor("checksums"))
    if not keys:
        raise UEDatasetsError(f"{directory}: the sample store is empty")
    y = torch.cat(labels)
    return SampleStore(directory, keys, y, torch.cat(sums), torch.cat(shapes),
                       num_classes if num_classes is not None else int(y.max()) + 1)
