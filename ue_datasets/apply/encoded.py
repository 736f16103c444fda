"""Protect encoded images (bytes or PIL) to PNG (or WebP, JPEG) bytes: the path shared by the record-based adapters.

The ``datasets.map`` function, the webdataset stage, the shard rewriter and the parquet rewriter all
go through `protect_encoded_stream` (or `protect_encoded`, its one-batch form): decode and
mode-normalise each image, check its label (or its text), run the tensor core once over the batch
(grouped by size), encode in the output format (lossless PNG by default; `OutputFormat`). A sample
that cannot be protected, or whose image the output format cannot hold (a grayscale WebP, an alpha
channel in JPEG), comes back as a
`SampleError` in its slot, so the caller decides to fail or to skip and record it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image

from ..artifact import Protection
from ..errors import SampleError, UEDatasetsError
from ..kernels.samples import colour_planes
from .core import check_label, method_of, needs_labels, needs_texts, protect_batch, uncovered
from .images import (
    DEFAULT_MAX_PIXELS, PNG_LEVEL, Decoded, OutputFormat, decode_with_profile, holds_image, image_tensor,
)
from .texts import TextSource


@dataclass(frozen=True)
class Item:
    """One image to protect: its sample's key, the image (encoded bytes or PIL), the label (or None),
    the shard or file it comes from when that differs from the batch's source, the field that holds it
    (named in errors), and the text it is protected by where the protection needs one (`needs_texts`;
    resolved by `ue_datasets.apply.texts.TextSource`)."""

    key: str
    image: bytes | Image.Image
    label: Any = None
    source: str | None = None
    field: str | None = None
    text: str | None = None


#: What an adapter does with a sample that cannot be protected: raise, or leave it out and record it.
ON_ERROR = ("fail", "skip")


class Unprotected(bytes):
    """The PNG (or WebP, JPEG) of an image that passed through unprotected (``unfitted="pass"``): bytes, marked so
    that the writers count it (``unprotected`` in the stats)."""


#: Why a sample the protection holds no noise for is refused (``unfitted="error"``).
NOT_FITTED = ("the protection holds no noise for this sample: it was not fitted on it, or its pixels differ from "
              "the fitted image's; --unfitted pass (unfitted='pass') lets such samples through unprotected")

T = TypeVar("T")
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def shared_pool() -> ThreadPoolExecutor:
    """A process-wide thread pool for decoding and encoding (PIL releases the GIL in its codecs).

    Made anew in a forked child (DataLoader workers, ``datasets`` map workers): a pool's threads do
    not survive ``fork``.
    """
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="ue-codec")
        _POOL = (os.getpid(), pool)
    return _POOL[1]


def field_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Field or column names given as one name or several."""
    return (value,) if isinstance(value, str) else tuple(value)


def refuse_hidden_image(row: Callable[[str], Any], columns: Iterable[str]) -> None:
    """Raise when one of a table row's ``columns`` (``row(column)`` gives its cell) holds image data.

    Raises:
        UEDatasetsError: naming the column, so that no image leaves unprotected in another column.
    """
    hidden = next((c for c in columns if holds_image(row(c))), None)
    if hidden is not None:
        raise UEDatasetsError(f"column {hidden!r} holds image data; protect it in another pass (image field or "
                              "column), or keep it as it is with keep_fields / --keep-field")


def text_columns(texts: TextSource | None, label_column: str) -> list[str]:
    """The columns a table adapter reads to resolve texts by ``texts`` (``None``: none are needed)."""
    if texts is None:
        return []
    return [texts.field] if texts.field is not None else [label_column] if texts.from_labels else []


def row_text(protection: Protection, texts: TextSource | None, row: Callable[[str], Any], label_column: str,
             key: str) -> str | None:
    """The text of a table row by ``texts`` (``row(column)`` gives its cell): its caption, or its label's
    class-name prompt; ``None`` when ``texts`` is (no text needed).

    Raises:
        UEDatasetsError: a missing caption, a label with no class name... (`TextSource.text`).
    """
    if texts is None:
        return None
    return texts.text(protection, caption=row(texts.field) if texts.field is not None else None,
                      label=row(label_column) if texts.from_labels else None, key=key)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter), lazily."""
    group: list[T] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _decode_item(protection: Protection, item: Item, labelled: bool, texted: bool, max_pixels: int) -> Decoded:
    if labelled:
        reason = check_label(protection, item.label)
        if reason:
            raise UEDatasetsError(reason)
    if texted and not isinstance(item.text, str):
        raise UEDatasetsError("no text for this sample: this protection finds its noise by text (a caption, or a "
                              "class-name prompt)")
    try:
        if isinstance(item.image, (bytes, bytearray, memoryview)):
            return decode_with_profile(bytes(item.image), max_pixels)
        return Decoded(image_tensor(item.image))
    except UEDatasetsError as e:
        raise UEDatasetsError(f"image field {item.field!r}: {e}" if item.field else str(e)) from None


def protect_encoded_stream(
    protection: Protection,
    batches: Iterable[tuple[T, Sequence[Item]]],
    source: str,
    device: torch.device | str | None = None,
    png_level: int = PNG_LEVEL,
    pool: Executor | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    unfitted: str = "error",
    output_format: OutputFormat | str | None = None,
) -> Iterator[tuple[T, list[bytes | SampleError]]]:
    """Protect a stream of batches, overlapping the tensor core with decoding and encoding.

    While the core runs on batch n in this thread, the pool decodes batch n+1 and encodes batch n-1,
    so on a CPU the codec work and the filtering share the cores instead of taking turns. At most
    three batches are in flight.

    Args:
        batches: ``(payload, items)`` pairs; the payload (the caller's samples, rows...) is passed
            back with the results of its items.
        max_pixels: images that declare more pixels are refused before decoding.
        unfitted: a sample the protection holds no noise for (not in its noise bank) is a `SampleError`
            (``"error"``) or passes through unprotected as `Unprotected` bytes (``"pass"``).
        output_format: how images are written (`OutputFormat` or its spec, ``"webp"``, ``"jpeg:90"``);
            default PNG at ``png_level``. An image the format cannot hold is a `SampleError`.

    Yields:
        ``(payload, results)`` in input order, one encoded image or `SampleError` per item.
    """
    pool = pool or shared_pool()
    fmt = OutputFormat.parse(output_format, png_level)
    labelled, texted = needs_labels(protection), needs_texts(protection)
    partial = method_of(protection).covers is not None

    def load(item: Item) -> Decoded | SampleError:
        try:
            decoded = _decode_item(protection, item, labelled, texted, max_pixels)
            refused = fmt.refusal(decoded.pixels.shape[0], tuple(decoded.pixels.shape[-2:]))
            if refused is not None:
                raise UEDatasetsError(f"image field {item.field!r}: {refused}" if item.field else refused)
            return decoded
        except UEDatasetsError as e:
            return SampleError(item.source or source, item.key, str(e))

    def start(batch: tuple[T, Sequence[Item]] | None) -> tuple[T, Sequence[Item], list[Future]] | None:
        return None if batch is None else (batch[0], batch[1], [pool.submit(load, it) for it in batch[1]])

    def protect(payload: T, items: Sequence[Item], decoding: list[Future]) -> tuple[T, list[Any]]:
        results: list[Any] = [f.result() for f in decoding]
        ok = [i for i, d in enumerate(results) if not isinstance(d, SampleError)]
        if partial:
            for i in [i for i in ok if bool(uncovered(protection, colour_planes(results[i].pixels)[None], [items[i].key])[0])]:
                ok.remove(i)
                results[i] = (SampleError(items[i].source or source, items[i].key, NOT_FITTED) if unfitted == "error"
                              else pool.submit(lambda d: Unprotected(fmt.encode(d.pixels, d.icc_profile)),
                                               results[i]))
        if ok:
            protected = protect_batch(
                protection,
                [results[i].pixels for i in ok],
                labels=[int(items[i].label) for i in ok] if labelled else None,
                keys=[items[i].key for i in ok],
                device=device,
                texts=[items[i].text for i in ok] if texted else None,
            )
            for i, t in zip(ok, protected):
                results[i] = pool.submit(fmt.encode, t, results[i].icc_profile)
        return payload, results

    def finish(payload: T, results: list[Any]) -> tuple[T, list[bytes | SampleError]]:
        return payload, [r.result() if isinstance(r, Future) else r for r in results]

    batches = iter(batches)
    decoding = start(next(batches, None))
    encoding = None
    while decoding is not None or encoding is not None:
        following = start(next(batches, None))
        protected = protect(*decoding) if decoding is not None else None
        if encoding is not None:
            yield finish(*encoding)
        encoding, decoding = protected, following


def protect_encoded(
    protection: Protection,
    items: Sequence[Item],
    source: str,
    device: torch.device | str | None = None,
    png_level: int = PNG_LEVEL,
    pool: Executor | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    unfitted: str = "error",
    output_format: OutputFormat | str | None = None,
) -> list[bytes | SampleError]:
    """Protect one batch of encoded images; one encoded image (or the reason it failed) per item, in order.

    Args:
        protection: a fitted `Protection`.
        items: the samples; labels (texts) are read when the method needs them.
        source: shard, file or dataset name used in error messages.
        device: where the core computes (``"auto"``: CUDA when available).
        png_level: zlib level of the written PNG (lossless at any level).
        pool: executor for decode and encode; the shared thread pool by default.
        max_pixels: images that declare more pixels are refused before decoding.
        unfitted, output_format: as for `protect_encoded_stream`.
    """
    for _, results in protect_encoded_stream(protection, [(None, items)], source, device, png_level, pool,
                                             max_pixels, unfitted, output_format):
        return results
    return []
