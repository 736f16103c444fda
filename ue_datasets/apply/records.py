"""Read the samples of any source `protect` accepts, in source order, without decoding their images.

Used wherever a stage needs the samples themselves rather than rewritten shards: fitting a protection
from data (features for Unlearnable Clusters) and loading data for the audit. Sample keys follow the
adapters' conventions, so a key seen at fit time is the key the same sample has when it is protected:
``__key__`` for webdataset shards; the key column when one is named (for a ``save_to_disk`` dataset,
else its ``__key__`` column when it has one), else the row index (within the file for parquet, within
the split for a dataset).

No field is ever unpickled; only the image (and, when asked for, the label) of each sample is read,
unless every column of a table is asked for (``fields``, as `verify` compares labels with the clean source).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from ..errors import SampleError, SourceError, UEDatasetsError
from ..kernels.samples import colour_planes
from .images import image_tensor
from .sources import resolve
from .wds import image_field_of, label_of, read_samples


@dataclass(frozen=True)
class Record:
    """One sample: where it comes from, its key, its encoded image (bytes or PIL) and its raw label;
    ``fields`` when every field is read, ``text`` (raw: bytes in shards) when a text field is (see
    `iter_records`)."""

    source: str
    key: str
    image: bytes | Any
    label: Any = None
    fields: dict[str, Any] | None = None
    text: Any = None


def _read(path: str | None) -> bytes:
    if not path:
        raise UEDatasetsError("image has neither bytes nor a path")
    with fsspec.open(path, "rb") as f:
        return f.read()


def iter_records(
    src: str,
    *,
    image_field: str | None = None,
    label_field: str | None = None,
    key_field: str | None = None,
    labels: bool = False,
    one_split: bool = False,
    fields: bool = False,
    text_field: str | None = None,
) -> Iterator[Record]:
    """Every sample of ``src`` (shards, parquet files or a ``save_to_disk`` directory), in order.

    Args:
        src: as for ``ue-datasets protect``.
        image_field: the image field (auto for shards) or column (``image``).
        label_field: the label field (``cls``) or column (``label``); read only when ``labels``.
        key_field: a column of sample keys for tables (default: the row index).
        labels: read labels (a missing or non-integer label is a `SampleError`).
        one_split: refuse a ``DatasetDict`` instead of reading its splits one after the other.
        fields: tables only: also read every other column, into ``fields`` (image columns undecoded).
        text_field: also read this caption field (webdataset ``txt``) or column, into ``text``; a
            sample without it is a `SampleError`.

    Raises:
        SampleError: a sample lacks its image or label (names the file and the key).
        SourceError: a file or dataset cannot be read (corrupt, truncated).
        UEDatasetsError: the source cannot be resolved; several splits with ``one_split``.
    """
    source = resolve(src)
    if source.kind == "wds":
        field = label_field or "cls"
        for url in source.urls:
            with fsspec.open(url, "rb") as f:
                for sample in read_samples(f, url):
                    if isinstance(sample, SampleError):
                        raise sample
                    try:
                        if text_field is not None and text_field not in sample:
                            raise UEDatasetsError(f"missing caption field {text_field!r} (fields: "
                                                  f"{', '.join(sorted(k for k in sample if not k.startswith('__')))})")
                        yield Record(url, sample["__key__"], sample[image_field_of(sample, image_field)],
                                     label_of(sample, field) if labels else None,
                                     text=None if text_field is None else sample[text_field])
                    except UEDatasetsError as e:
                        raise SampleError(url, sample["__key__"], str(e)) from None
        return
    image_col, label_col = image_field or "image", label_field or "label"
    columns = ([image_col] + ([label_col] if labels else []) + ([key_field] if key_field else [])
               + ([text_field] if text_field else []))
    if source.kind == "hf":
        yield from _dataset_records(src, source.urls[0], image_col, label_col, key_field, labels, one_split, fields,
                                    text_field)
        return
    for url in source.urls:
        try:
            yield from _parquet_records(url, image_col, label_col, key_field, columns, labels, fields, text_field)
        except (pa.ArrowException, OSError) as e:
            raise SourceError(url, f"cannot read the parquet file ({type(e).__name__}: {e})") from None


def _dataset_records(src: str, path: str, image_col: str, label_col: str, key_field: str | None, labels: bool,
                     one_split: bool, fields: bool, text_field: str | None = None) -> Iterator[Record]:
    """The records of a ``save_to_disk`` dataset (see `iter_records`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as e:
        raise SourceError(src, f"cannot load the dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict) and one_split:
        splits = ", ".join(posixpath.join(src, s) for s in ds)
        raise UEDatasetsError(f"{src} holds several splits; give one of: {splits}")
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, part in splits:
        name = src if split is None else f"{src}[{split}]"
        for col in [image_col] + ([label_col] if labels else []) + ([key_field] if key_field else []) + (
                [text_field] if text_field else []):
            if col not in part.column_names:
                raise UEDatasetsError(f"{name}: no column {col!r} (columns: {part.column_names})")
        for col, feature in part.features.items():
            if isinstance(feature, datasets.Image) and (col == image_col or fields):
                part = part.cast_column(col, datasets.Image(decode=False))
        column = key_field or ("__key__" if "__key__" in part.column_names else None)
        if not fields:
            part = part.select_columns(list(dict.fromkeys(
                c for c in (image_col, label_col if labels else None, column, text_field) if c)))
        try:
            for i, row in enumerate(part):
                key = str(row[column]) if column else str(i)
                image = row[image_col]
                try:
                    data = image if not isinstance(image, dict) else (
                        image["bytes"] if image.get("bytes") is not None else _read(image.get("path")))
                except UEDatasetsError as e:
                    raise SampleError(name, key, str(e)) from None
                yield Record(name, key, data, row[label_col] if labels else None,
                             {k: v for k, v in row.items() if k != image_col} if fields else None,
                             row[text_field] if text_field else None)
        except pa.ArrowException as e:
            raise SourceError(name, f"cannot read the dataset ({type(e).__name__}: {e})") from None


def _parquet_records(url: str, image_col: str, label_col: str, key_field: str | None, columns: list[str],
                     labels: bool, fields: bool, text_field: str | None = None) -> Iterator[Record]:
    """The records of one parquet file (see `iter_records`)."""
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        for col in columns:
            if col not in names:
                raise UEDatasetsError(f"{url}: no column {col!r} (columns: {names})")
        offset = 0
        for batch in parquet.iter_batches(batch_size=256, columns=None if fields else list(dict.fromkeys(columns))):
            rows = batch.to_pydict()
            for i, image in enumerate(rows[image_col]):
                key = str(rows[key_field][i]) if key_field else str(offset + i)
                data = image["bytes"] if isinstance(image, dict) else image
                if data is None:
                    raise SampleError(url, key, "image has no bytes")
                yield Record(url, key, data, rows[label_col][i] if labels else None,
                             {k: v[i] for k, v in rows.items() if k != image_col} if fields else None,
                             rows[text_field][i] if text_field else None)
            offset += batch.num_rows


def colour_image(record: Record) -> Any:
    """The record's image decoded as uint8 ``(C, H, W)``, C = 1 or 3 (`colour_planes`), as the core sees it.

    Raises:
        SampleError: the image cannot be decoded (names the file and the key).
    """
    try:
        return colour_planes(image_tensor(record.image))
    except UEDatasetsError as e:
        raise SampleError(record.source, record.key, str(e)) from None
