"""Protect a batch of table rows (a dict of columns): the body shared by the ``datasets.map`` function
(`ue_datasets.apply.hf.ProtectMap`) and the Ray Data adapter (`ue_datasets.apply.ray.ProtectBatches`).

Columns become `Item`s, the items go through `protect_encoded` (the one tensor core, in batches), and
the caller gets back which rows are kept and their new image bytes; every other column is the caller's
to pass on unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..artifact import Protection
from ..errors import SampleError, UEDatasetsError
from .core import needs_labels, needs_texts
from .encoded import Item, Unprotected, protect_encoded, refuse_hidden_image, row_text, text_columns
from .texts import TextSource


@dataclass(frozen=True)
class RowOptions:
    """How a table adapter reads and protects rows (see `ue_datasets.apply.hf.ProtectMap` for each)."""

    image_column: str
    label_column: str
    on_error: str
    png_level: int
    max_pixels: int
    unfitted: str
    keep_columns: tuple[str, ...]
    scan_columns: Sequence[str] | None
    text_source: TextSource
    source: str
    output_format: str = "png"


def cell_image(value: Any) -> Any:
    """Encoded bytes (or a PIL image) of an image cell; a path-only image is read from a local file only.

    Cells are raw bytes, PIL images, or ``{"bytes", "path"}`` dicts (the ``Image`` feature's storage).
    """
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        path = value.get("path")
        if path:
            if "://" in path and not path.startswith("file://"):
                raise UEDatasetsError(f"image is stored as a URL only ({path!r}); it is not fetched")
            try:
                with open(path.removeprefix("file://"), "rb") as f:
                    return f.read()
            except OSError as e:
                raise UEDatasetsError(f"cannot read the image file {path!r} ({type(e).__name__})") from None
        return None
    return value


def check_columns(protection: Protection, columns: Sequence[str], options: RowOptions) -> TextSource | None:
    """Refuse a batch that lacks a column the protection needs; returns the text source, if texts are needed."""
    if options.image_column not in columns:
        raise UEDatasetsError(f"image column {options.image_column!r} not in the dataset (columns: {sorted(columns)})")
    texts = options.text_source if needs_texts(protection) else None
    if texts is not None:
        texts.check_resolvable()
    if needs_labels(protection) and options.label_column not in columns:
        raise UEDatasetsError(f"label column {options.label_column!r} not in the dataset (columns: {sorted(columns)})")
    missing = [c for c in text_columns(texts, options.label_column) if c not in columns]
    if missing:
        what = "caption" if texts.field is not None else "label"  # type: ignore[union-attr]
        raise UEDatasetsError(f"{what} column {missing[0]!r} not in the dataset (columns: {sorted(columns)})")
    return texts


def protect_rows(
    protection: Protection,
    batch: dict[str, Sequence[Any]],
    keys_of: Callable[[int], Sequence[str]],
    options: RowOptions,
    device: str,
    skipped: list[dict[str, str]],
    unprotected: list[dict[str, str]],
    warn_skipped: bool = False,
    label: Callable[[Any], Any] = lambda v: v,
) -> tuple[list[int], list[bytes]]:
    """Protect the image column of ``batch``.

    Args:
        batch: columns of equal length; image cells as `cell_image` reads them.
        keys_of: ``keys_of(n)`` gives each of the ``n`` rows' stable key (for partial and sample-wise
            protections, and messages); asked once the columns are checked.
        options: the columns and the error policy.
        device: where the tensor core runs.
        skipped: with ``on_error="skip"``, each skipped row is appended (source, key, reason).
        unprotected: rows passed through unprotected (``unfitted="pass"``) are appended (source, key).
        warn_skipped: also warn for each skipped row.
        label: turns a label cell into a class id (webdataset's ``cls`` bytes, say).

    Returns:
        The indices of the rows kept, and their new image bytes, in order.

    Raises:
        SampleError: with ``on_error="fail"``, the first bad row, by source and key.
    """
    texts = check_columns(protection, list(batch), options)
    images = batch[options.image_column]
    n = len(images)
    keys = keys_of(n)
    labelled = needs_labels(protection)
    scanned = [c for c in (batch if options.scan_columns is None else options.scan_columns)
               if c in batch and c != options.image_column and c not in options.keep_columns]
    results: list[Any] = [None] * n
    items: list[tuple[int, Item]] = []
    for i in range(n):
        try:
            def cell(c: str, i: int = i) -> Any:
                return label(batch[c][i]) if c == options.label_column else batch[c][i]

            refuse_hidden_image(cell, scanned)
            text = row_text(protection, texts, cell, options.label_column, keys[i])
            items.append((i, Item(keys[i], cell_image(images[i]), cell(options.label_column) if labelled else None,
                                  text=text)))
        except UEDatasetsError as e:
            results[i] = SampleError(options.source, keys[i], str(e))
    done = protect_encoded(protection, [it for _, it in items], options.source, device, options.png_level,
                           max_pixels=options.max_pixels, unfitted=options.unfitted,
                           output_format=options.output_format)
    for (i, _), r in zip(items, done):
        results[i] = r
        if isinstance(r, Unprotected):
            unprotected.append({"source": options.source, "key": keys[i]})
    keep, encoded = [], []
    for i, r in enumerate(results):
        if isinstance(r, SampleError):
            if options.on_error == "fail":
                raise r
            if warn_skipped:
                warnings.warn(f"skipped {r}")
            skipped.append({"source": r.source, "key": r.key, "reason": r.reason})
        else:
            keep.append(i)
            encoded.append(r)
    return keep, encoded
