"""Parquet adapter: rewrite parquet files file-to-file, one input row group at a time.

The image column is a Hugging Face ``Image`` struct (``{bytes, path}``) or a plain binary column;
protected images are written as bytes of the output format (``ShardOptions.format``: lossless PNG by
default, or WebP, JPEG) with ``path`` null. Every other column, the schema
and its metadata (the ``huggingface`` features entry) are kept, so ``datasets`` reads the output with
the same features, and each input row group gives one output row group (less its skipped rows).
Another column of images (an ``Image`` feature at any depth) fails the file, and image bytes in any
other column (binary, or structs and lists holding binary) fail their row, unless the column is listed
in ``keep_fields``: no image is published unprotected. Sample keys are the key column when
given, else the row index within the file. A protection that finds noise by text (T2UE) reads each
row's caption from ``text_field`` (there is no default caption column), or makes a prompt from its
label with ``class_names``. Files are written and resumed as webdataset shards are
(`ue_datasets.apply.shards`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..artifact import Protection, as_protection
from ..errors import SampleError, SourceError, UEDatasetsError
from .core import needs_labels, needs_texts
from .encoded import Item, Unprotected, batched, protect_encoded_stream, refuse_hidden_image, row_text, text_columns
from .images import warn_if_lossy
from .shards import ShardOptions, ShardStats, check_not_empty, commit_file, run


def _image_value(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            raise UEDatasetsError(f"image is stored as a path only ({value['path']!r}), not embedded bytes")
        return None
    return value


def _has_image_feature(feature: Any) -> bool:
    if isinstance(feature, dict):
        return feature.get("_type") == "Image" or any(_has_image_feature(v) for v in feature.values())
    if isinstance(feature, list):
        return any(_has_image_feature(v) for v in feature)
    return False


def _nested(t: pa.DataType) -> list[pa.DataType]:
    if pa.types.is_struct(t):
        return [t.field(i).type for i in range(t.num_fields)]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [t.value_type]
    if pa.types.is_map(t):
        return [t.key_type, t.item_type]
    return []


def _holds_binary(t: pa.DataType) -> bool:
    """Whether values of type ``t`` can hold bytes, at any depth."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    return any(_holds_binary(u) for u in _nested(t))


def image_columns(schema: pa.Schema) -> list[str]:
    """Columns declared to hold images, at any depth, by ``Image`` features in the ``huggingface``
    metadata. (Other ``{bytes, path}`` structs are also ``Audio`` and the like: their bytes are looked
    at row by row instead.)"""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        features = {}
    if not isinstance(features, dict):
        features = {}
    return [f.name for f in schema if _has_image_feature(features.get(f.name))]


def protect_parquet_file(
    protection: Protection,
    in_url: str,
    out_url: str,
    options: ShardOptions = ShardOptions(label_field="label", image_field="image"),
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Rewrite one parquet file with protected images; see the module docstring."""
    image_col = options.image_field or "image"
    label_col = options.label_field
    labelled = needs_labels(protection)
    texts = options.text_source if needs_texts(protection) else None
    if texts is not None:
        texts.check_resolvable()

    def body(f: Any, stats: ShardStats) -> list[str]:
        try:
            src = fsspec.open(in_url, "rb").open()
        except OSError as e:
            raise SourceError(in_url, f"cannot open ({type(e).__name__}: {e})") from None
        with src:
            keys = rewrite(src, f, stats)
        check_not_empty(stats, in_url, options, "empty file: no rows")
        return keys

    def read_group(parquet: pq.ParquetFile, i: int) -> pa.Table:
        try:
            return parquet.read_row_group(i)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(in_url, f"cannot read row group {i} of {parquet.num_row_groups} "
                                      f"({type(e).__name__}: {e})") from None

    def rewrite(src: Any, f: Any, stats: ShardStats) -> list[str]:
        try:
            parquet = pq.ParquetFile(src)
        except (OSError, pa.ArrowException) as e:
            raise SourceError(in_url, f"cannot read parquet ({type(e).__name__}: {e})") from None
        schema = parquet.schema_arrow
        needed = ([image_col] + ([label_col] if labelled else []) + ([options.key_field] if options.key_field else [])
                  + text_columns(texts, label_col))
        for col in dict.fromkeys(needed):
            if schema.get_field_index(col) < 0:
                raise SourceError(in_url, f"no column {col!r} (columns: {', '.join(schema.names)})")
        others = [c for c in image_columns(schema) if c != image_col and c not in options.keep_fields]
        if others:
            raise SourceError(in_url, f"column(s) {', '.join(map(repr, others))} hold images too and would be "
                                      f"published unprotected; protect them in another pass (--image-field), or "
                                      f"list them with --keep-field to keep them as they are")
        image_type = schema.field(image_col).type
        image_index = schema.get_field_index(image_col)
        scanned = [f.name for f in schema  # where an image could hide: every other column with bytes in it
                   if f.name != image_col and f.name not in options.keep_fields and _holds_binary(f.type)]
        written: list[str] = []
        offset = 0

        wanted = list(dict.fromkeys([image_col, *([label_col] if labelled else []),
                                     *([options.key_field] if options.key_field else []),
                                     *text_columns(texts, label_col), *scanned]))

        def groups() -> Iterator[tuple[tuple[pa.Table, list[str], dict[int, Any], bool], list[Item]]]:
            nonlocal offset
            for g in range(parquet.num_row_groups):
                table = read_group(parquet, g)
                rows = table.select(wanted).to_pydict()
                n = table.num_rows
                keys = [str(k) for k in rows[options.key_field]] if options.key_field else [
                    str(offset + i) for i in range(n)]
                offset += n
                outcome: dict[int, Any] = {}  # row -> Item to protect, or its SampleError
                for i in range(n):
                    try:
                        refuse_hidden_image(lambda c: rows[c][i], scanned)  # noqa: B023
                        label = rows[label_col][i] if labelled else None
                        text = row_text(protection, texts, lambda c: rows[c][i], label_col, keys[i])  # noqa: B023
                        outcome[i] = Item(keys[i], _image_value(rows[image_col][i]), label, text=text)
                    except UEDatasetsError as e:
                        outcome[i] = SampleError(in_url, keys[i], str(e))
                rows_to_protect = [i for i, v in outcome.items() if isinstance(v, Item)]
                chunks = list(batched(rows_to_protect, options.batch_size)) or [[]]
                for c, chunk in enumerate(chunks):  # the core sees batch_size rows; the group is written once
                    yield (table, keys, outcome, c == len(chunks) - 1), [outcome[i] for i in chunk]

        with pq.ParquetWriter(f, schema) as writer:
            stream = protect_encoded_stream(protection, groups(), in_url, options.device, options.png_level,
                                            max_pixels=options.max_pixels, unfitted=options.unfitted,
                                            output_format=options.output_format)
            done: list[Any] = []
            for (table, keys, outcome, last), results in stream:
                done.extend(results)
                if not last:
                    continue
                n = table.num_rows
                stats.samples += n
                outcome.update(zip([i for i, v in outcome.items() if isinstance(v, Item)], done))
                done = []
                keep = []
                for i in range(n):
                    r = outcome[i]
                    if isinstance(r, SampleError):
                        if options.on_error == "fail":
                            raise r
                        stats.skip(r.key, r.reason)
                    else:
                        stats.unprotected += isinstance(r, Unprotected)
                        keep.append(i)
                pngs = [outcome[i] for i in keep]
                images = pa.array([{"bytes": b, "path": None} for b in pngs] if pa.types.is_struct(image_type) else pngs,
                                  type=image_type)
                kept = table.take(pa.array(keep, type=pa.int64()))
                kept = kept.set_column(image_index, schema.field(image_col), images)
                if kept.num_rows:
                    writer.write_table(kept, row_group_size=max(1, kept.num_rows))
                written.extend(keys[i] for i in keep)
                if progress is not None:
                    progress(n)
        return written

    return commit_file(protection, in_url, out_url, options, overwrite, body)


def protect_parquet(
    protection: Protection | str | os.PathLike,
    inputs: str | Sequence[str],
    output_dir: str,
    options: ShardOptions = ShardOptions(label_field="label", image_field="image"),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    engine: str | Any = "local",
) -> list[dict[str, Any]]:
    """Rewrite parquet files into ``output_dir`` (same names), resuming finished ones.

    ``protection`` is a `Protection` or its artifact directory; ``inputs`` a list of file URLs, or one
    string as ``ue-datasets protect --input`` takes it (a brace pattern, glob or folder); ``engine`` as
    `ue_datasets.apply.shards.run` takes it (``"local"``, ``"ray"`` or a ``RayEngine``).
    """
    from .sources import input_files

    urls, patterns = input_files(inputs, "parquet")
    warn_if_lossy(options.output_format)
    return run(protect_parquet_file, as_protection(protection), urls, output_dir, options, workers, overwrite,
               progress, patterns, engine)
