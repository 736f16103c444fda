"""Protect encoded images (bytes or PIL) to PNG bytes: the path shared by the record-based adapters.

The ``datasets.map`` function, the webdataset stage, the shard rewriter and the parquet rewriter all
go through `protect_encoded`: decode and mode-normalise each image, check its label, run the tensor
core once over the batch (grouped by size), encode lossless PNG. A sample that cannot be protected
comes back as a `SampleError` in its slot, so the caller decides to fail or to skip and record it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..artifact import Protection
from ..errors import SampleError, UEDatasetsError
from .core import check_label, needs_labels, protect_batch
from .images import PNG_LEVEL, decode, encode_png, normalize_mode, pil_to_tensor


@dataclass(frozen=True)
class Item:
    """One sample to protect: its key, its image (encoded bytes or PIL) and its label (or None)."""

    key: str
    image: bytes | Image.Image
    label: Any = None


_POOL: ThreadPoolExecutor | None = None


def shared_pool() -> ThreadPoolExecutor:
    """A process-wide thread pool for decoding and encoding (PIL releases the GIL in its codecs)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="ue-codec")
    return _POOL


def _decode_item(protection: Protection, item: Item, labelled: bool) -> torch.Tensor:
    if labelled:
        reason = check_label(protection, item.label)
        if reason:
            raise UEDatasetsError(reason)
    if isinstance(item.image, Image.Image):
        return pil_to_tensor(normalize_mode(item.image))
    if isinstance(item.image, (bytes, bytearray, memoryview)):
        return pil_to_tensor(decode(bytes(item.image)))
    raise UEDatasetsError(f"expected image bytes or a PIL image, got {type(item.image).__name__}")


def protect_encoded(
    protection: Protection,
    items: Sequence[Item],
    source: str,
    device: torch.device | str | None = None,
    png_level: int = PNG_LEVEL,
    pool: Executor | None = None,
) -> list[bytes | SampleError]:
    """Protect a batch of encoded images; one PNG (or the reason it failed) per item, in order.

    Args:
        protection: a fitted `Protection`.
        items: the samples; labels are read when the method needs them.
        source: shard, file or dataset name used in error messages.
        device: where the core computes (``"auto"``: CUDA when available).
        png_level: zlib level of the written PNG (lossless at any level).
        pool: executor for decode and encode; the shared thread pool by default.
    """
    pool = pool or shared_pool()
    labelled = needs_labels(protection)

    def load(item: Item) -> torch.Tensor | SampleError:
        try:
            return _decode_item(protection, item, labelled)
        except UEDatasetsError as e:
            return SampleError(source, item.key, str(e))

    decoded = list(pool.map(load, items))
    ok = [i for i, d in enumerate(decoded) if not isinstance(d, SampleError)]
    results: list[bytes | SampleError] = list(decoded)  # type: ignore[arg-type]
    if ok:
        protected = protect_batch(
            protection,
            [decoded[i] for i in ok],  # type: ignore[misc]
            labels=[int(items[i].label) for i in ok] if labelled else None,
            keys=[items[i].key for i in ok],
            device=device,
        )
        for i, png in zip(ok, pool.map(lambda t: encode_png(t, png_level), protected)):
            results[i] = png
    return results
