"""Load a labelled image source (the same sources `protect` accepts) into tensors for the audit.

Images are decoded exactly as the adapters decode them (EXIF orientation, mode rules of
`ue_datasets.apply.images`), alpha is dropped, grayscale images are widened to RGB when the source
mixes both, and everything is stacked into one uint8 tensor: the audit trains on in-memory tensors.
"""

from __future__ import annotations

import numbers
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..apply.images import image_tensor, resize_square
from ..apply.records import Record, iter_records
from ..apply.sources import resolve
from ..errors import SampleError, UEDatasetsError


@dataclass
class LabelledImages:
    """Images, labels and sample keys of one source.

    Attributes:
        images: uint8 ``(N, C, H, W)``, C = 1 or 3.
        labels: int64 ``(N,)``.
        keys: one key per sample (``__key__`` of shards, the key column or the row index of tables).
        source: where it came from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, index: torch.Tensor | list[int]) -> LabelledImages:
        index = torch.as_tensor(index, dtype=torch.int64)
        return LabelledImages(self.images[index], self.labels[index], [self.keys[i] for i in index.tolist()], self.source)


def _records(src: str, label_field: str | None, image_field: str | None, key_field: str | None) -> Iterator[Record]:
    """Labelled records of one split; parquet rows are keyed ``FILE:ROW`` so that files do not collide."""
    qualify = key_field is None and resolve(src).kind == "parquet"
    for r in iter_records(src, image_field=image_field, label_field=label_field, key_field=key_field, labels=True,
                          one_split=True):
        yield Record(r.source, f"{posixpath.basename(r.source)}:{r.key}", r.image, r.label) if qualify else r


def load_labelled(
    src: str,
    label_field: str | None = None,
    image_field: str | None = None,
    key_field: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
) -> LabelledImages:
    """Read ``src`` (shards, a ``save_to_disk`` directory or parquet files) into tensors.

    Args:
        src: as for ``ue-datasets protect``.
        label_field: ``cls`` for shards, ``label`` for tables by default.
        image_field: the image field or column (auto for shards, ``image`` for tables).
        key_field: key column for tables (default: row index; ``FILE:ROW`` for parquet).
        image_size: resize every image to ``image_size`` x ``image_size`` (bilinear, antialias);
            without it all images must share one size.
        limit: read at most this many samples, in source order.

    Raises:
        SampleError: an image cannot be decoded or a label is missing (names source and key).
        UEDatasetsError: mixed sizes without ``image_size``; an empty source.
    """
    keys, images, labels = [], [], []
    for r in _records(src, label_field, image_field, key_field):
        where, key, data, label = r.source, r.key, r.image, r.label
        if limit is not None and len(keys) >= limit:
            break
        try:
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise UEDatasetsError(f"label {label!r} is not an integer")
            t = image_tensor(data)
        except UEDatasetsError as e:
            raise SampleError(where, key, str(e)) from None
        t = t[:3] if t.shape[0] >= 3 else t[:1]  # drop alpha
        if image_size is not None:
            t = resize_square(t, image_size)
        keys.append(key)
        images.append(t)
        labels.append(int(label))
    if not keys:
        raise UEDatasetsError(f"{src}: no samples")
    sizes = {tuple(t.shape[-2:]) for t in images}
    if len(sizes) > 1:
        raise UEDatasetsError(f"{src}: images of several sizes {sorted(sizes)[:4]}...; pass --image-size")
    if {t.shape[0] for t in images} == {1, 3}:
        images = [t.expand(3, -1, -1) for t in images]
    return LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64), keys, src)


def align(clean: LabelledImages, protected: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of clean and protected images with the same key, for imperceptibility metrics.

    Returns:
        Two uint8 ``(M, C, H, W)`` tensors, M = number of shared keys (in the protected order).
    """
    where = {k: i for i, k in enumerate(clean.keys)}
    pairs = [(where[k], j) for j, k in enumerate(protected.keys) if k in where]
    if not pairs:
        raise UEDatasetsError(f"{clean.source} and {protected.source} share no sample key; cannot compare them")
    a = clean.images[torch.tensor([p[0] for p in pairs])]
    b = protected.images[torch.tensor([p[1] for p in pairs])]
    if a.shape != b.shape:
        raise UEDatasetsError(f"clean images {tuple(a.shape[1:])} and protected {tuple(b.shape[1:])} differ in shape")
    return a, b
