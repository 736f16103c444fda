"""One call that protects any source into an output of the same form: what ``ue-datasets protect`` runs.

>>> import ue_datasets
>>> protection = ue_datasets.fit("cuda", num_classes=10, key=123456789)
>>> result = ue_datasets.protect("shards/", "doc-protected/", protection, progress=False)
>>> print(result.summary())  # doctest: +ELLIPSIS
protected 20 of 20 samples (20 changed, 0 skipped) in 4 shard(s) -> doc-protected/ [... s]
>>> ue_datasets.protect("shards/", "doc-protected/", protection, progress=False).resumed
4

A source is what `ue_datasets.apply.sources.resolve` takes: webdataset shards, a ``save_to_disk``
directory or parquet files (one input string, or several).
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..artifact import Protection, as_protection
from ..errors import UEDatasetsError
from .commit import read_json, stats_url
from .distribute import distributor_for
from .images import DEFAULT_MAX_PIXELS, PNG_LEVEL, OutputFormat, lossy_warned, warn_if_lossy
from .shards import DEFAULT_BATCH_SIZE, ShardOptions
from .sources import HF_STATS, Source, protect_source, resolve

if TYPE_CHECKING:
    from .ray import RayEngine

#: The parts of a skip reason that vary from sample to sample: addresses, quoted values, numbers.
_VARIABLE = re.compile(r"0x[0-9a-fA-F]+|'[^']*'|\"[^\"]*\"|\d+")
#: Default of ``max_skipped``: a run that skips more than this share of its samples is reported as failed.
DEFAULT_MAX_SKIPPED = "1%"


@dataclass
class ProtectResult:
    """What one `protect` call did.

    Attributes:
        kind: the source kind (``wds``, ``parquet`` or ``hf``).
        output: where it was written.
        files: the stats of every output file (for a dataset, of the dataset directory), as written
            beside them (``NAME_stats.json``, ``ue_datasets_stats.json``), with ``resumed`` set for
            files a previous run had completed.
        seconds: wall time of the call.
    """

    kind: str
    output: str
    files: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def _total(self, name: str) -> int:
        return sum(int(s[name]) for s in self.files)

    @property
    def samples(self) -> int:
        """Samples read."""
        return self._total("samples")

    @property
    def written(self) -> int:
        """Samples written (read minus skipped)."""
        return self._total("written")

    @property
    def protected(self) -> int:
        """Samples written with a protection applied (fewer than ``written`` for a partial protection)."""
        return self._total("protected")

    @property
    def unprotected(self) -> int:
        """Samples written unprotected because the protection holds no noise for them (``unfitted="pass"``)."""
        return sum(int(s.get("unprotected", 0)) for s in self.files)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Every skipped sample: ``{"key", "reason"}`` (and ``"file"`` or ``"source"``)."""
        return [{**s, "file": f["output"]} if "source" not in s else s for f in self.files for s in f["skipped"]]

    @property
    def resumed(self) -> int:
        """Files a previous run had completed and that were kept."""
        return sum(bool(s.get("resumed")) for s in self.files)

    def skip_reasons(self, top: int = 3) -> list[tuple[str, int]]:
        """The most common kinds of reason samples were skipped for, most common first: one example
        reason of each kind and how many samples had a reason of that kind (reasons that differ only in
        numbers, quoted values and addresses are of one kind: ``label 7 is out of range [0, 5)`` and
        ``label 9 ...``)."""
        kinds: Counter[str] = Counter()
        example: dict[str, str] = {}
        for s in self.skipped:
            kind = _VARIABLE.sub("_", s["reason"])
            kinds[kind] += 1
            example.setdefault(kind, s["reason"])
        return [(example[kind], n) for kind, n in kinds.most_common(top)]

    def summary(self) -> str:
        """One line: what was read, written, protected and skipped, and where."""
        resumed = f", {self.resumed} already done" if self.resumed else ""
        files = {"wds": f"{len(self.files)} shard(s)", "parquet": f"{len(self.files)} parquet file(s)",
                 "hf": "a save_to_disk dataset"}[self.kind]
        passed = f", {self.unprotected} passed unprotected" if self.unprotected else ""
        return (f"protected {self.written} of {self.samples} samples ({self.protected} changed{passed}, "
                f"{len(self.skipped)} skipped) in {files}{resumed} -> {self.output} [{self.seconds:.1f} s]")


class TooManySkipped(UEDatasetsError):
    """More samples were skipped than ``max_skipped`` allows. The outputs are written (and resumable);
    ``result`` says what was done and `ProtectResult.skip_reasons` why samples were left out."""

    def __init__(self, result: ProtectResult, limit: int):
        self.result, self.limit = result, limit
        skipped = len(result.skipped)
        reasons = "; ".join(f"{n} x {reason}" + (" (or alike)" if n > 1 else "") for reason, n in result.skip_reasons())
        super().__init__(
            f"{skipped} of {result.samples} samples were skipped, more than the {limit} allowed (--max-skipped); "
            f"the outputs are written, but check the options (label field, number of classes...): {reasons}")

    def __reduce__(self):  # picklable across processes, as the other errors are
        return (type(self), (self.result, self.limit))


def skip_limit(max_skipped: int | str, samples: int) -> int:
    """The number of skipped samples allowed out of ``samples``: ``max_skipped`` is a count (``10``) or a
    share (``"1%"``, rounded down)."""
    if isinstance(max_skipped, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*%\s*", max_skipped)
        if match:
            share = float(match.group(1))
            if share > 100:
                raise UEDatasetsError(f"max_skipped must be at most 100%, got {max_skipped!r}")
            return int(samples * share / 100)
        if not max_skipped.strip().isdigit():
            raise UEDatasetsError(f"max_skipped is a count (10) or a share (1%), got {max_skipped!r}")
        max_skipped = int(max_skipped)
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 0:
        raise UEDatasetsError(f"max_skipped is a count >= 0 or a share such as '1%', got {max_skipped!r}")
    return max_skipped


def warn_if_protected(source: Source) -> None:
    """Warn when the input is an output of ue-datasets itself (a stats file of ours beside its first
    files, or in its dataset directory): protecting protected data again is almost always a mistake of
    paths."""
    if source.kind == "hf":
        places = [posixpath.join(source.urls[0], HF_STATS)]
    else:
        places = [stats_url(url) for url in source.urls[:3]]
    for place in places:
        stats = read_json(place)
        if stats and isinstance(stats.get("protection"), dict):
            warnings.warn(f"{place}: the input is itself an output of ue-datasets (protection "
                          f"{stats['protection'].get('id')}); it is being protected again", stacklevel=3)
            return


def protect(
    src: str | os.PathLike | Sequence[str | os.PathLike],
    dst: str | os.PathLike,
    protection: Protection | str | os.PathLike,
    *,
    label_field: str | None = None,
    image_field: str | None = None,
    key_field: str | None = None,
    keep_fields: str | Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    encoder: str | None = None,
    on_error: str = "fail",
    max_skipped: int | str = DEFAULT_MAX_SKIPPED,
    png_level: int = PNG_LEVEL,
    format: str | OutputFormat = "png",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    unfitted: str = "error",
    text_field: str | None = None,
    class_names: Sequence[str] = (),
    template: str | None = None,
    workers: int = 1,
    engine: str | RayEngine = "local",
    overwrite: bool = False,
    progress: bool = True,
) -> ProtectResult:
    """Protect ``src`` into ``dst`` (the same form), as ``ue-datasets protect`` does; resumable.

    Args:
        src: webdataset shards (a ``.tar`` path or URL, a brace pattern, a glob or a folder), a
            ``save_to_disk`` directory or parquet files; or several shard or parquet inputs.
        dst: a folder for shards or parquet files (same names as the inputs), or a dataset directory.
        protection: a `Protection` or its artifact directory.
        label_field: field or column of the class id (default ``cls`` for shards, ``label`` otherwise).
        image_field: field or column of the image (default: every image field of a shard sample; ``image``).
        key_field: column of stable sample keys in tables (default: the row index).
        keep_fields: fields or columns that hold images but are published unprotected (masks).
        batch_size: images per call of the tensor core.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        encoder: clusters protections only: where the surrogate encoder's weights are now, as an
            encoder spec (`ue_datasets.apply.clusters.use_encoder`).
        on_error: ``"fail"`` stops at the first bad sample; ``"skip"`` leaves it out and records it.
        max_skipped: with ``on_error="skip"``, how many skipped samples are acceptable: a count or a
            share of the samples read (``"1%"``). Above it the outputs are still written, then
            `TooManySkipped` is raised.
        png_level: zlib level of the written PNGs (lossless at any level).
        format: how protected images are written: ``"png"`` (default, lossless), ``"webp"`` (lossless
            WebP, faster to write and smaller; RGB and RGBA images only) or ``"jpeg:Q"`` (lossy JPEG at
            quality Q, 4:4:4; L and RGB images only). Lossy output erases part of the perturbation and
            warns (`ue_datasets.apply.images.LossyOutputWarning`) once per call.
        max_pixels: images that declare more pixels are refused before decoding.
        unfitted: samples a sample-wise protection holds no noise for (its noise bank was fitted on
            other data): ``"error"`` fails them (or skips them with ``on_error="skip"``), ``"pass"``
            writes them unprotected and counts them (``unprotected`` in the stats and the result).
        text_field: protections that find noise by text (T2UE) only: the field or column of each sample's
            caption (default for shards: ``txt``, webdataset's; tables have no default).
        class_names: names by class id (`ue_datasets.apply.texts.read_class_names` reads a file of them):
            without ``text_field``, each sample's text is a prompt made from its label's name. A dataset's
            ``ClassLabel`` label column gives its names by default.
        template: the prompt template, with ``{name}`` (default: the protection's, ``"a photo of a {name}."``).
        workers: processes, each protecting whole files (shards and parquet), with the local engine.
        engine: ``"local"`` (this machine), ``"ray"`` or a `ue_datasets.apply.ray.RayEngine` (the
            cluster's address, GPUs per task): one Ray task per shard or parquet file, the same bytes.
        overwrite: redo outputs completed earlier, also those made with another protection.
        progress: show progress (bars on a terminal, periodic lines otherwise).

    Returns:
        A `ProtectResult`.

    Raises:
        TooManySkipped: more samples were skipped than ``max_skipped`` (outputs written).
        UEDatasetsError: bad input (naming the file and sample), an output that may not be written.
    """
    start = time.perf_counter()
    skip_limit(max_skipped, 0)  # a bad value fails before any work
    output_format = OutputFormat.parse(format, png_level)  # so does a bad format
    distributor_for(engine, workers)  # so does an engine that cannot run (ray not installed)
    source, dst = resolve(src), os.fspath(dst)
    protection = as_protection(protection)
    if encoder is not None:
        from .clusters import use_encoder

        protection = use_encoder(protection, encoder, device=device)
    warn_if_protected(source)
    warn_if_lossy(output_format)
    options = ShardOptions(
        label_field=label_field or ("cls" if source.kind == "wds" else "label"), image_field=image_field,
        key_field=key_field, keep_fields=keep_fields, batch_size=batch_size, device=device, on_error=on_error,
        png_level=png_level, max_pixels=max_pixels, unfitted=unfitted, text_field=text_field,
        class_names=tuple(class_names), template=template, format=output_format.spec,
    )
    with lossy_warned():
        _, stats = protect_source(protection, source, dst, options, workers, overwrite, progress, engine)
    result = ProtectResult(source.kind, dst, stats, time.perf_counter() - start)
    limit = skip_limit(max_skipped, result.samples)
    if len(result.skipped) > limit:
        raise TooManySkipped(result, limit)
    return result

