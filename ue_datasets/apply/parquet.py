"""Parquet adapter: rewrite parquet files file-to-file, streaming record batches.

The image column is a Hugging Face ``Image`` struct (``{bytes, path}``) or a plain binary column;
protected images are written as lossless PNG bytes with ``path`` null. Every other column, the schema
and its metadata (the ``huggingface`` features entry) are kept, so ``datasets`` reads the output with
the same features. Sample keys are the key column when given, else the row index within the file.
Files are written and resumed as webdataset shards are (`ue_datasets.apply.shards`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..artifact import Protection
from ..errors import SampleError, SourceError, UEDatasetsError
from .core import needs_labels
from .encoded import Item, protect_encoded_stream
from .shards import ShardOptions, ShardStats, atomic_write, check_not_empty, finish, run


def _image_value(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            raise UEDatasetsError(f"image is stored as a path only ({value['path']!r}), not embedded bytes")
        return None
    return value


def protect_parquet_file(
    protection: Protection,
    in_url: str,
    out_url: str,
    options: ShardOptions = ShardOptions(label_field="label", image_field="image"),
    progress: Callable[[int], None] | None = None,
) -> ShardStats:
    """Rewrite one parquet file with protected images; see the module docstring."""
    start = time.perf_counter()
    stats = ShardStats(in_url, out_url, protection=protection.public())
    image_col = options.image_field or "image"
    label_col = options.label_field
    labelled = needs_labels(protection)
    keys_seen: list[str] = []

    def write(f: Any) -> None:
        try:
            src = fsspec.open(in_url, "rb").open()
        except OSError as e:
            raise SourceError(in_url, f"cannot open ({type(e).__name__}: {e})") from None
        with src:
            rewrite(src, f)

    def rewrite(src: Any, f: Any) -> None:
        try:
            parquet = pq.ParquetFile(src)
        except (OSError, pa.ArrowInvalid) as e:
            raise SourceError(in_url, f"cannot read parquet ({type(e).__name__}: {e})") from None
        schema = parquet.schema_arrow
        for col in [image_col] + ([label_col] if labelled else []) + ([options.key_field] if options.key_field else []):
            if schema.get_field_index(col) < 0:
                raise SourceError(in_url, f"no column {col!r} (columns: {', '.join(schema.names)})")
        image_type = schema.field(image_col).type

        def batches() -> Iterator[tuple[tuple[pa.RecordBatch, list[str], dict[int, Any]], list[Item]]]:
            offset = 0
            for batch in parquet.iter_batches(batch_size=options.batch_size):
                rows = batch.to_pydict()
                n = batch.num_rows
                keys = [str(k) for k in rows[options.key_field]] if options.key_field else [
                    str(offset + i) for i in range(n)
                ]
                offset += n
                outcome: dict[int, Any] = {}  # row -> Item to protect, or its SampleError
                for i in range(n):
                    try:
                        label = rows[label_col][i] if labelled else None
                        outcome[i] = Item(keys[i], _image_value(rows[image_col][i]), label)
                    except UEDatasetsError as e:
                        outcome[i] = SampleError(in_url, keys[i], str(e))
                yield (batch, keys, outcome), [v for v in outcome.values() if isinstance(v, Item)]

        with pq.ParquetWriter(f, schema) as writer:
            stream = protect_encoded_stream(protection, batches(), in_url, options.device, options.png_level)
            for (batch, keys, outcome), done in stream:
                n = batch.num_rows
                stats.samples += n
                outcome.update(zip([i for i, v in outcome.items() if isinstance(v, Item)], done))
                keep = []
                for i in range(n):
                    r = outcome[i]
                    if isinstance(r, SampleError):
                        if options.on_error == "fail":
                            raise r
                        stats.skip(r.key, r.reason)
                    else:
                        keep.append(i)
                pngs = [outcome[i] for i in keep]
                images = pa.array([{"bytes": b, "path": None} for b in pngs] if pa.types.is_struct(image_type) else pngs,
                                  type=image_type)
                kept = batch.take(pa.array(keep, type=pa.int64()))
                kept = kept.set_column(schema.get_field_index(image_col), schema.field(image_col), images)
                writer.write_batch(kept)
                keys_seen.extend(keys[i] for i in keep)
                if progress is not None:
                    progress(n)
        check_not_empty(stats, options, "empty file: no rows")

    atomic_write(out_url, write)
    return finish(stats, protection, keys_seen, start)


def protect_parquet(
    protection: Protection,
    inputs: Sequence[str],
    output_dir: str,
    options: ShardOptions = ShardOptions(label_field="label", image_field="image"),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rewrite parquet files into ``output_dir`` (same names), resuming finished ones."""
    return run(protect_parquet_file, protection, inputs, output_dir, options, workers, overwrite, progress)
