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

import fsspec
import torch
import torch.nn.functional as F

from ..apply.images import decode, normalize_mode, pil_to_tensor
from ..apply.sources import resolve
from ..errors import SampleError, UEDatasetsError
from ..apply.wds import image_field_of, label_of, read_samples


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


def _records(src: str, label_field: str | None, image_field: str | None, key_field: str | None
             ) -> Iterator[tuple[str, str, bytes | object, object]]:
    """``(file or dataset, key, image bytes or PIL, raw label)`` of every sample, in source order."""
    source = resolve(src)
    if source.kind == "wds":
        field = label_field or "cls"
        for url in source.urls:
            with fsspec.open(url, "rb") as f:
                for sample in read_samples(f, url):
                    try:
                        yield url, sample["__key__"], sample[image_field_of(sample, image_field)], label_of(sample, field)
                    except UEDatasetsError as e:
                        raise SampleError(url, sample["__key__"], str(e)) from None
        return
    if source.kind == "hf":
        import datasets

        ds = datasets.load_from_disk(source.urls[0])
        if isinstance(ds, datasets.DatasetDict):
            splits = ", ".join(posixpath.join(src, s) for s in ds)
            raise UEDatasetsError(f"{src} holds several splits; give one of: {splits}")
        image_col, label_col = image_field or "image", label_field or "label"
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        for i, row in enumerate(ds):
            image = row[image_col]
            key = str(row[key_field]) if key_field else str(i)
            yield src, key, image["bytes"] if image.get("bytes") is not None else _read(image.get("path")), row[label_col]
        return
    import pyarrow.parquet as pq

    image_col, label_col = image_field or "image", label_field or "label"
    for url in source.urls:
        with fsspec.open(url, "rb") as f:
            table = pq.read_table(f, columns=[c for c in (image_col, label_col, key_field) if c])
        rows = table.to_pydict()
        for i, (image, label) in enumerate(zip(rows[image_col], rows[label_col])):
            key = str(rows[key_field][i]) if key_field else f"{posixpath.basename(url)}:{i}"
            yield url, key, image["bytes"] if isinstance(image, dict) else image, label


def _read(path: str | None) -> bytes:
    if not path:
        raise UEDatasetsError("image has neither bytes nor a path")
    with fsspec.open(path, "rb") as f:
        return f.read()


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
    for where, key, data, label in _records(src, label_field, image_field, key_field):
        if limit is not None and len(keys) >= limit:
            break
        try:
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise UEDatasetsError(f"label {label!r} is not an integer")
            t = pil_to_tensor(decode(data) if isinstance(data, (bytes, bytearray)) else normalize_mode(data))
        except UEDatasetsError as e:
            raise SampleError(where, key, str(e)) from None
        t = t[:3] if t.shape[0] >= 3 else t[:1]  # drop alpha
        if image_size is not None and tuple(t.shape[-2:]) != (image_size, image_size):
            t = F.interpolate(t[None].float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
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
