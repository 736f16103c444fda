"""Hugging Face ``datasets`` adapter: a batched ``map`` function and `protect_dataset`.

`ProtectMap` is the function to chain into a preprocessing pipeline:

>>> import datasets
>>> from ue_datasets import fit
>>> protection = fit("cuda", num_classes=10, key=123456789)
>>> ds = datasets.load_from_disk("my_dataset_dir")
>>> fn = ProtectMap(protection, image_column="image", label_column="label")
>>> protected = ds.map(fn, batched=True, with_indices=True, with_rank=True, features=ds.features,
...                    new_fingerprint=fn.fingerprint(ds._fingerprint))
>>> protected.features["image"], protected.num_rows
(Image(mode=None, decode=True), 8)

`protect_dataset` does exactly that for a `Dataset`, `IterableDataset` (streaming) or a dict of splits.
Images come back as new bytes in the output format (``format``: lossless PNG by default, ``"webp"``
lossless, ``"jpeg:Q"`` lossy) as ``{"bytes": ..., "path": None}``, so the ``Image`` feature is kept and
the output never points at the original, unprotected file.

``num_proc=N`` works on CPU whatever ran before in the parent: a forked worker runs torch with one
thread, so it never waits on the OpenMP pool of its parent (huggingface/datasets#5094). Multi-GPU: with
``num_proc=N`` and ``with_rank=True`` each worker computes on ``cuda:{rank % count}``; CUDA must not be
initialised in the parent, and the start method must be ``spawn``
(``multiprocess.set_start_method("spawn")`` under ``if __name__ == "__main__":``).

Every ``Image`` column is protected or refused: `protect_dataset` protects ``image_column`` and fails
on another ``Image`` column unless it is listed in ``keep_columns``.

A protection that finds noise by text (T2UE) takes each row's caption from ``text_column``, or makes a
prompt from its label with ``class_names``; `protect_dataset` takes the class names of a ``ClassLabel``
label column when it is given neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..artifact import Protection, as_protection, load_protection
from ..errors import UEDatasetsError
from ..version import __version__
from .core import UNFITTED, needs_keys, needs_texts
from .encoded import ON_ERROR, field_names
from .images import (
    DEFAULT_MAX_PIXELS,
    PNG_LEVEL,
    OutputFormat,
    lossy_warned,
    warn_if_lossy,
)
from .rows import RowOptions, protect_rows
from .texts import TextSource

#: The process that imported this module; a forked child inherits it, a spawned one imports anew.
_IMPORTED_IN = os.getpid()


def _single_thread_if_forked() -> None:
    """In a forked process, run torch with one thread: the OpenMP pool of the parent did not survive
    the fork, and the first parallel op would wait on it forever (huggingface/datasets#5094)."""
    global _IMPORTED_IN
    if os.getpid() != _IMPORTED_IN:
        torch.set_num_threads(1)
        _IMPORTED_IN = os.getpid()


class ProtectMap:
    """A picklable, batched ``datasets.map`` function that protects an image column.

    Args:
        protection: a `Protection`, or the directory of a saved artifact (loaded lazily in each
            worker, so only the path is pickled).
        image_column: column of images (``Image`` feature: PIL images or ``{"bytes", "path"}`` dicts).
        label_column: column of class ids, for methods that need labels.
        key_column: column of stable sample keys (used by partial protections); by default
            ``__key__`` when present, else the row index (pass ``with_indices=True``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``; with a ``rank`` and several
            GPUs, ``cuda:{rank % count}``.
        on_error: ``"fail"`` raises `SampleError` naming the row; ``"skip"`` drops the row and records
            it in `skipped` (of this process): pass your own list to collect them, else each skipped row
            is also a warning.
        png_level: zlib level of the written PNGs (lossless at any level).
        as_bytes: return raw image bytes instead of ``{"bytes", "path": None}`` (for binary columns).
        source: name used in error messages.
        max_pixels: images that declare more pixels (width x height) are refused before decoding.
        keep_columns: columns passed on as they are although they hold images; image data in any other
            column fails its row, so no image is published unprotected.
        scan_columns: the columns looked into for image data (default: all; `protect_dataset` names
            those whose features can hold bytes).
        text_column: for protections that find noise by text (T2UE): the column of each row's caption.
        class_names: names by class id: without ``text_column``, a row's text is the prompt ``template``
            makes from its label's name.
        template: the prompt template, with ``{name}``; default: the protection's own.
        format: how images are written (`ue_datasets.apply.images.OutputFormat` or its spec): ``"png"``
            (default), ``"webp"`` (lossless) or ``"jpeg:Q"`` (lossy: warns once, here).

    Call: ``fn(batch: dict[str, list], indices: list[int] | None = None, rank: int | None = None)``.
    """

    def __init__(
        self,
        protection: Protection | str | os.PathLike,
        image_column: str = "image",
        label_column: str = "label",
        key_column: str | None = None,
        device: str = "auto",
        on_error: str = "fail",
        png_level: int = PNG_LEVEL,
        as_bytes: bool = False,
        source: str = "dataset",
        skipped: list[dict[str, str]] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        keep_columns: tuple[str, ...] | list[str] = (),
        scan_columns: list[str] | None = None,
        unfitted: str = "error",
        unprotected: list[dict[str, str]] | None = None,
        text_column: str | None = None,
        class_names: Sequence[str] = (),
        template: str | None = None,
        format: str | OutputFormat = "png",
    ):
        output_format = OutputFormat.parse(format, png_level)
        if on_error not in ON_ERROR:
            raise UEDatasetsError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if unfitted not in UNFITTED:
            raise UEDatasetsError(f"unfitted must be one of {UNFITTED}, got {unfitted!r}")
        if isinstance(protection, Protection):
            self._protection: Protection | None = protection
            self.path = None
            self.digest, self.protection_id = protection.digest, protection.id
        else:
            self._protection, self.path = None, str(protection)
            loaded = load_protection(self.path)
            self.digest, self.protection_id = loaded.digest, loaded.id
        self.image_column, self.label_column, self.key_column = image_column, label_column, key_column
        self.device, self.on_error, self.png_level = device, on_error, png_level
        self.as_bytes, self.source, self.max_pixels = as_bytes, source, max_pixels
        self.keep_columns = field_names(keep_columns)
        self.scan_columns = scan_columns
        self.skipped: list[dict[str, str]] = [] if skipped is None else skipped
        self.warn_skipped = skipped is None  # a caller that collects the skipped rows reports them itself
        self.unfitted = unfitted
        self.unprotected: list[dict[str, str]] = [] if unprotected is None else unprotected
        self.text_source = TextSource(text_column, tuple(class_names), template)
        self.format = output_format.spec
        warn_if_lossy(output_format)

    @property
    def output_format(self) -> OutputFormat:
        """How images are written: `format` with `png_level`."""
        return OutputFormat.parse(self.format, self.png_level)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["skipped"] = []
        state["unprotected"] = []
        if self.path is not None:
            state["_protection"] = None  # workers load it themselves
        return state

    @property
    def protection(self) -> Protection:
        if self._protection is None:
            self._protection = load_protection(self.path)  # type: ignore[arg-type]
            if self._protection.digest != self.digest:
                raise UEDatasetsError(f"{self.path}: the artifact changed since this map function was made")
        return self._protection

    def fingerprint(self, previous: str | None = None) -> str:
        """A deterministic ``new_fingerprint``: package version, protection id, options, input.

        (The id, not the digest: fingerprints are saved with datasets, and a digest could be used to
        test guesses of the key.)
        """
        spec = json.dumps(
            [__version__, self.protection_id, self.image_column, self.label_column, self.key_column, self.on_error,
             self.png_level, self.as_bytes, self.max_pixels, list(self.keep_columns), self.unfitted,
             self.text_source.settings(), *([self.format] if self.format != "png" else []), previous],
            sort_keys=True,
        )
        return "ue-" + hashlib.sha256(spec.encode()).hexdigest()[:32]

    def _device(self, rank: int | None) -> str:
        if rank is not None and self.device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{rank % torch.cuda.device_count()}"
        return self.device

    def _keys(self, batch: dict[str, list], indices: list[int] | None, n: int) -> list[str]:
        column = self.key_column or ("__key__" if "__key__" in batch else None)
        if column is not None:
            if column not in batch:
                raise UEDatasetsError(f"key column {column!r} not in the dataset (columns: {sorted(batch)})")
            return [str(k) for k in batch[column]]
        if indices is None:
            if needs_keys(self.protection):
                raise UEDatasetsError("this protection needs sample keys: pass with_indices=True or key_column")
            return [str(i) for i in range(n)]
        return [str(i) for i in indices]

    def row_options(self) -> RowOptions:
        return RowOptions(self.image_column, self.label_column, self.on_error, self.png_level, self.max_pixels,
                          self.unfitted, self.keep_columns, self.scan_columns, self.text_source, self.source,
                          self.format)

    def __call__(self, batch: dict[str, list], indices: list[int] | None = None, rank: int | None = None) -> dict:
        _single_thread_if_forked()
        keep, encoded = protect_rows(self.protection, batch, lambda n: self._keys(batch, indices, n),
                                     self.row_options(), self._device(rank), self.skipped, self.unprotected,
                                     self.warn_skipped)
        n = len(batch[self.image_column])
        out = {col: [values[i] for i in keep] for col, values in batch.items()} if len(keep) < n else dict(batch)
        out[self.image_column] = [b if self.as_bytes else {"bytes": b, "path": None} for b in encoded]
        return out


def _any_feature(feature: Any, leaf: Callable[[Any], bool]) -> bool:
    """Whether ``leaf`` holds for a ``datasets`` feature or any feature inside it (dicts, lists,
    ``Sequence``/``List``); the same walk as `ue_datasets.apply.parquet.image_columns` makes over the
    features' JSON form."""
    if isinstance(feature, dict):
        return any(_any_feature(f, leaf) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_any_feature(f, leaf) for f in feature)
    inner = getattr(feature, "feature", None)
    return _any_feature(inner, leaf) if inner is not None else leaf(feature)


def _has_image(feature: Any) -> bool:
    """Whether a ``datasets`` feature is, or holds at any depth, an ``Image``."""
    import datasets

    return _any_feature(feature, lambda f: isinstance(f, datasets.Image))


def _may_hold_bytes(feature: Any) -> bool:
    """Whether a ``datasets`` feature can hold encoded bytes (binary values, ``Image``, ``Audio``...) at any depth."""
    import datasets

    def leaf(f: Any) -> bool:
        if isinstance(f, datasets.Value):
            return f.dtype in ("binary", "large_binary")
        numbers_or_text = (datasets.ClassLabel, datasets.Translation, datasets.TranslationVariableLanguages)
        return not isinstance(f, numbers_or_text) and not type(f).__name__.startswith("Array")  # Array2D..5D

    return _any_feature(feature, leaf)


def class_names_of(features: Any, column: str) -> tuple[str, ...]:
    """The class names of a ``datasets.ClassLabel`` column (``features[column].names``); ``()`` for any other."""
    import datasets

    feature = None if features is None else features.get(column)
    return tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else ()


def _is_image_feature(features: Any, column: str) -> bool:
    import datasets

    return features is None or isinstance(features.get(column), datasets.Image)


def protect_dataset(
    dataset: Any,
    protection: Protection | str | os.PathLike,
    image_column: str = "image",
    label_column: str = "label",
    key_column: str | None = None,
    batch_size: int = 1000,
    device: str = "auto",
    num_proc: int | None = None,
    on_error: str = "fail",
    png_level: int = PNG_LEVEL,
    writer_batch_size: int = 100,
    source: str = "dataset",
    skipped: list[dict[str, str]] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_columns: tuple[str, ...] | list[str] = (),
    unfitted: str = "error",
    unprotected: list[dict[str, str]] | None = None,
    text_column: str | None = None,
    class_names: Sequence[str] = (),
    template: str | None = None,
    format: str | OutputFormat = "png",
    **map_kwargs: Any,
) -> Any:
    """Protect the image column of a ``datasets`` dataset (map-style, streaming, or a dict of splits).

    Keeps ``features`` (``Image``, ``ClassLabel``), uses the row index as sample key unless a key
    column is given, and sets a deterministic ``new_fingerprint`` so caches are reused exactly when
    the input, the protection, the options and the package version are the same.

    ``batch_size`` rows go through each call of the map function, so through one call of the tensor
    core and of the codec pool. The default, 1000, is ``datasets.map``'s own: on 28x28 Fashion-MNIST
    on CPU, 64 was as fast on idle cores and up to 3.4x slower on busy ones, and 4000 no faster
    (``recipes/bench_adapters.py``); lower it only to bound memory on large images.

    With ``on_error="skip"`` bad rows are dropped and, when the map runs in this process, appended
    to ``skipped`` as ``{"key", "reason"}`` (or warned about one by one when no list is given). Another ``Image`` column fails unless it is named in
    ``keep_columns`` (kept as it is); images declaring more than ``max_pixels`` pixels are refused.
    Rows a sample-wise protection holds no noise for fail (``unfitted="error"``) or are kept unprotected
    (``"pass"``) and, when the map runs in this process, appended to ``unprotected`` as ``{"source", "key"}``.
    A protection that finds noise by text (T2UE) takes each row's caption from ``text_column``, else a
    prompt (``template``) from its label's name in ``class_names``, by default the names of a ``ClassLabel``
    label column. ``format`` is how images are written: ``"png"`` (default), ``"webp"`` (lossless) or
    ``"jpeg:Q"`` (lossy; warns once, `ue_datasets.apply.images.LossyOutputWarning`).

    Returns:
        A dataset of the same kind with protected images (lazy for an ``IterableDataset``).
    """
    import datasets

    output_format = OutputFormat.parse(format, png_level)
    warn_if_lossy(output_format)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        with lossy_warned():
            return type(dataset)({
                split: protect_dataset(d, protection, image_column, label_column, key_column, batch_size, device,
                                       num_proc, on_error, png_level, writer_batch_size, f"{source}[{split}]",
                                       skipped, max_pixels, keep_columns, unfitted, unprotected, text_column,
                                       class_names, template, output_format, **map_kwargs)
                for split, d in dataset.items()
            })
    features = dataset.features
    keep_columns = field_names(keep_columns)
    names = class_names_of(features, label_column) if text_column is None and not class_names else ()
    if names and needs_texts(as_protection(protection)):
        class_names = names
    others = [c for c, f in (features or {}).items()
              if _has_image(f) and c != image_column and c not in keep_columns]
    if others:
        raise UEDatasetsError(f"{source}: column(s) {', '.join(map(repr, others))} hold images too and would be "
                              "published unprotected; protect them in another pass (image_column), or list them "
                              "in keep_columns (--keep-field) to keep them as they are")
    if features is not None and isinstance(features.get(image_column), datasets.Image) and features[image_column].decode:
        # Decode in ProtectMap, not in datasets: a bad image then fails (or is skipped) naming its row.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    with lossy_warned():
        fn = ProtectMap(protection, image_column, label_column, key_column, device, on_error, png_level,
                        as_bytes=not _is_image_feature(features, image_column), source=source, skipped=skipped,
                        max_pixels=max_pixels, keep_columns=keep_columns, unfitted=unfitted, unprotected=unprotected,
                        scan_columns=None if features is None else [c for c, f in features.items()
                                                                    if _may_hold_bytes(f)],
                        text_column=text_column, class_names=class_names, template=template, format=output_format)
    if isinstance(dataset, datasets.IterableDataset):
        # IterableDataset.map(features=...) takes the output as already decoded; cast decodes the PNGs.
        mapped = dataset.map(fn, batched=True, batch_size=batch_size, with_indices=True, **map_kwargs)
        return mapped if features is None else mapped.cast(features)
    return dataset.map(
        fn,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        with_rank=True,
        features=features,
        num_proc=num_proc,
        writer_batch_size=writer_batch_size,
        new_fingerprint=fn.fingerprint(dataset._fingerprint),
        desc="protect",
        **map_kwargs,
    )
