"""Check, before publishing, that a protected output is really protected by an artifact and leaks nothing.

`verify` does three things:

* **files**: each output file checks out against its stats (size and sha256) and was written with
  this artifact (its ``protection.id``); a file with no stats, a file of the output folder (at any
  depth) that is neither an output file nor its stats, and an output file that cannot be read are
  reported;
* **samples** (with the clean source): samples are matched by file (a shard or parquet file's output
  name, a dataset's split) and key. The label (and, for shards, every field that is not a protected
  image, ``keep_fields`` included) must equal the clean sample's, byte for byte. Then the protection of
  each clean image is recomputed through the tensor core, with the sample's label and key, and compared
  pixel for pixel with the published image: every image of a shard sample, each under the name protect
  gives it (``jpg`` -> ``png``...); the image column of a table. A sample whose images are all equal is
  *protected* (an image the protection leaves as it is, as a partial protection does for unselected
  samples, included); one with a clean image instead is *unprotected*; anything else *tampered*. A key
  the clean source lacks is *foreign*; a clean key the output lacks is *missing* (informational) when
  its output file's stats list it as skipped at protect time, else *absent*. Images are read in the
  output format each file's stats record (``settings.format``; PNG when absent) and named after it
  (``jpg`` -> ``webp``...): WebP is lossless and checked exactly as PNG is. A lossy output
  (``jpeg:Q``) cannot hold the protection exactly: its images are compared with the recomputed
  protection encoded here as protect writes it, which on the same Pillow and libjpeg gives the same
  pixels (*protected*); a sample that differs is *approximate* (informational, with its largest
  difference and PSNR), unless it is the clean image (*unprotected*) or of another shape (*tampered*).
  The report says how far the written pixels are from the protection itself (largest difference,
  lowest PSNR).
* **leaks** (`ue_datasets.apply.leaks`): local paths, the artifact's digest or files, lock and partial
  files in anything that would be published.
"""

from __future__ import annotations

import math
import os
import posixpath
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import fsspec
import torch

from ..artifact import Protection, as_protection
from ..errors import SampleError, UEDatasetsError
from ..progress import progress_bar
from .core import check_label, needs_labels, needs_texts, protect_batch
from .encoded import field_names, row_text
from .images import OutputFormat, image_tensor
from .leaks import Finding, local_needles, scan
from .records import Record, iter_records
from .shards import output_name
from .sources import HF_STATS, KIND_NAMES, Source, resolve
from .texts import TextSource
from .verify_files import Id, check_files, skipped_keys, written_formats
from .wds import META, image_fields, label_of, output_names, read_samples, shard_texts, text_of

#: Samples per call of the tensor core.
BATCH = 64
#: Findings of each kind listed by `VerifyReport.summary`.
SHOWN = 5
#: The lists of `VerifyReport` that stop a publication, then the informational one, as shown.
PROBLEMS = ("unprotected", "tampered", "foreign", "absent", "files", "leaks")



@dataclass(frozen=True)
class SampleFinding:
    """A sample that is not as it should be: its file (or split), its key and why."""

    file: str
    key: str
    reason: str


@dataclass
class VerifyReport:
    """What `verify` found in one protected output; ``ok`` when nothing stops its publication.

    Counts: ``samples`` in the output, ``checked`` pixel for pixel, ``protected`` of those equal to the
    recomputed protection (written lossy: to its re-encoding), ``unchanged`` of those left as they are by
    the protection (unselected by a partial protection). ``formats``: the output formats of the files
    (`OutputFormat.spec`). ``lossy`` samples were checked in a lossy format, ``lossy_exact`` of them equal
    to the re-encoded protection; ``lossy_max_diff`` and ``lossy_min_psnr`` (dB) measure their pixels
    against the protection itself (``None`` without lossy samples). ``missing`` and ``approximate``
    (lossy samples that differ from the re-encoded protection) are informational; every other list is a
    problem.
    """

    output: str
    protection: dict[str, str]
    kind: str
    pixels_checked: bool
    samples: int = 0
    checked: int = 0
    protected: int = 0
    unchanged: int = 0
    formats: list[str] = field(default_factory=lambda: ["png"])
    lossy: int = 0
    lossy_exact: int = 0
    lossy_max_diff: int | None = None
    lossy_min_psnr: float | None = None
    unprotected: list[SampleFinding] = field(default_factory=list)
    tampered: list[SampleFinding] = field(default_factory=list)
    foreign: list[SampleFinding] = field(default_factory=list)
    absent: list[SampleFinding] = field(default_factory=list)
    missing: list[SampleFinding] = field(default_factory=list)
    approximate: list[SampleFinding] = field(default_factory=list)
    files: list[Finding] = field(default_factory=list)
    leaks: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(getattr(self, name) for name in PROBLEMS)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def summary(self) -> str:
        """A few lines for people: the verdict, the counts, the first findings of each kind."""
        problems = sum(len(getattr(self, name)) for name in PROBLEMS)
        formats = f", format {', '.join(self.formats)}" if self.formats != ["png"] else ""
        lines = [f"verify {self.output} ({KIND_NAMES[self.kind]}, protection {self.protection['id']}{formats}): "
                 + ("OK" if self.ok else f"{problems} problem(s)")]
        if self.pixels_checked:
            lines.append(f"  {self.checked} of {self.samples} samples checked pixel for pixel: {self.protected} "
                         f"protected ({self.unchanged} left unchanged by the protection)")
            if self.lossy:
                lines.append(f"  {self.lossy} sample(s) written lossy (JPEG): exact pixels cannot be checked; "
                             f"{self.lossy_exact} equal the recomputed protection encoded as protect writes it"
                             + (f"; the written pixels differ from the protection by up to {self.lossy_max_diff} "
                                f"(PSNR {self.lossy_min_psnr:.1f} dB at worst)" if self.lossy_min_psnr is not None
                                else ""))
        else:
            lines.append(f"  {self.samples} samples; pixels not checked (give the clean source to check them)")
        notes = {"missing": " (informational: skipped at protect time, as its stats say)",
                 "approximate": " (informational: written lossy, not the re-encoded protection exactly; another "
                                "Pillow or libjpeg than protect's encodes differently)"}
        for name in (*PROBLEMS[:4], "missing", "approximate", *PROBLEMS[4:]):
            found = getattr(self, name)
            if found:
                note = notes.get(name, "")
                lines.append(f"  {name}: {len(found)}{note}")
                for f in found[:SHOWN]:
                    where = f.key if isinstance(f, SampleFinding) else f.where
                    lines.append(f"    {f.file}" + (f" {where}" if where else "") + f": {f.reason}")
                if len(found) > SHOWN:
                    lines.append(f"    ... and {len(found) - SHOWN} more (--report FILE writes them all)")
        return "\n".join(lines)


class _Reader:
    """The samples of one side (output or clean), by input: each with its unit, what samples are matched
    within (a file's output name; a dataset's split, ``[train]``). Shard records carry every field.

    ``skipped`` (the output's, see `skipped_keys`) renumbers the rows of a table keyed by row index as protect
    numbered them: by their row in the clean source, counting the rows it skipped."""

    def __init__(self, kind: str, source: Source, options: dict[str, Any], skipped: dict[Id, str] | None = None):
        self.kind, self.options, self.skipped = kind, options, skipped or {}
        self.inputs = source.urls[:1] if kind == "hf" else source.urls

    def unit(self, src: str, name: str) -> str:
        """The unit of a sample of ``src`` whose record names ``name`` as its source."""
        return name[len(src):] if self.kind == "hf" else output_name(src)

    def read(self, src: str) -> Iterator[tuple[str, Record | SampleError]]:
        """Every sample of one input; a sample that `read_samples` refuses is its `SampleError`."""
        if self.kind != "wds":
            rows: dict[str, int] = {}
            for r in iter_records(src, image_field=self.options["image_field"], key_field=self.options["key_field"],
                                  fields=True):
                unit, by_row = self.unit(src, r.source), "__key__" not in (r.fields or {})
                if self.skipped and self.options["key_field"] is None and by_row:
                    row = rows.get(unit, 0)
                    while (unit, str(row)) in self.skipped:
                        row += 1
                    rows[unit] = row + 1
                    r = replace(r, key=str(row))
                yield unit, r
            return
        with fsspec.open(src, "rb") as f:
            for sample in read_samples(f, src):
                if not isinstance(sample, SampleError):
                    sample = Record(src, sample["__key__"], None,
                                    fields={k: v for k, v in sample.items() if k not in META})
                yield self.unit(src, src), sample

    def ids(self, inputs: Iterable[str]) -> Iterator[tuple[Id, Record]]:
        """``((unit, key), record)`` of every sample of ``inputs`` that could be read as one."""
        for src in inputs:
            for unit, r in self.read(src):
                if isinstance(r, Record):
                    yield (unit, r.key), r


def _images(protection: Protection, p: Record, c: Record, kind: str, options: dict[str, Any],
            keep_fields: tuple[str, ...], extension: str = "png") -> tuple[list[tuple[str, Any, Any]], Any, str | None]:
    """Each image to check, as ``(name, published, clean)``, and the label and the text (the clean
    sample's; ``None`` unless the protection needs one) to protect with. ``extension``: the output
    format's, which shard image fields are named after.

    Raises:
        UEDatasetsError: why the sample is tampered (a label or field differs from the clean sample...).
    """
    labelled = needs_labels(protection)
    texts = options["texts"] if needs_texts(protection) else None
    if kind != "wds":
        column = options["label_field"] or "label"
        if p.fields.get(column) != c.fields.get(column):  # type: ignore[union-attr]
            raise UEDatasetsError("label differs from the clean source")
        label = p.fields.get(column) if labelled else None  # type: ignore[union-attr]
        text = row_text(protection, texts, (c.fields or {}).get, column, c.key)
        return [(options["image_field"] or "image", p.image, c.image)], label, text
    out, clean = p.fields or {}, c.fields or {}
    label_field = options["label_field"] or "cls"
    try:
        fields = image_fields(clean, options["image_field"], keep_fields)
        names = output_names(clean, fields, extension)
    except UEDatasetsError as e:
        raise UEDatasetsError(f"the clean sample cannot be protected ({e})") from None
    others = sorted((k for k in clean if k not in fields), key=lambda k: k != label_field)  # the label first
    for k in others:
        if out.get(k) != clean[k]:
            what = "label" if k == label_field else f"field {k!r}"
            raise UEDatasetsError(f"{what} differs from the clean source" if k in out else f"{what} is not in the output")
    extra = [k for k in out if k not in others and k not in names.values()]
    if extra:
        raise UEDatasetsError(f"field {extra[0]!r} is not in the clean source")
    absent = [names[f] for f in fields if names[f] not in out]
    if absent:
        raise UEDatasetsError(f"image field {absent[0]!r} is not in the output")
    text = text_of(protection, {**clean, "__key__": c.key}, texts, label_field) if texts is not None else None
    return ([(names[f], out[names[f]], clean[f]) for f in fields], label_of(out, label_field) if labelled else None,
            text)


def _dataset_class_names(path: str, label_column: str) -> tuple[str, ...]:
    """The class names of a ``save_to_disk`` dataset's ``ClassLabel`` label column, as protect takes them."""
    import datasets

    from .hf import class_names_of

    ds = datasets.load_from_disk(path)
    parts = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    return class_names_of(parts[0].features, label_column) if parts else ()


def _verdict(out: torch.Tensor, exp: torch.Tensor, clean: torch.Tensor) -> tuple[str, str] | None:
    """Why a published image is not the protection of its clean image, as ``(list, reason)`` (``None``: it is)."""
    if torch.equal(out, exp):
        return None
    if torch.equal(out, clean):
        return "unprotected", "the published image is the clean image"
    if out.shape != exp.shape:
        return "tampered", f"image is {tuple(out.shape)} (C, H, W), the protected image would be {tuple(exp.shape)}"
    diff = (out.int() - exp.int()).abs()
    return "tampered", (f"{int((diff > 0).sum())} of {diff.numel()} values differ from the protection of the "
                        f"clean image (by up to {int(diff.max())})")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images of one shape (``inf`` when they are equal)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def _lossy_verdict(out: torch.Tensor, exp: torch.Tensor, clean: torch.Tensor, fmt: OutputFormat,
                   report: VerifyReport) -> tuple[str, str] | None:
    """As `_verdict`, for an image written in a lossy format: compared with the recomputed protection
    ``exp`` encoded as protect writes it (``None``: equal); records how far it is from ``exp``."""
    if out.shape != exp.shape:
        return "tampered", f"image is {tuple(out.shape)} (C, H, W), the protected image would be {tuple(exp.shape)}"
    try:
        written = image_tensor(fmt.encode(exp))
    except UEDatasetsError as e:  # protect refuses such an image (an alpha channel in JPEG...)
        return "tampered", f"protect cannot write this image as {fmt.spec} ({e})"
    if not torch.equal(out, written) and not torch.equal(exp, clean) and (
            torch.equal(out, clean) or torch.equal(out, image_tensor(fmt.encode(clean)))):
        return "unprotected", f"the published image is the clean image (written as {fmt.spec})"
    diff = int((out.int() - exp.int()).abs().max()) if out.numel() else 0
    report.lossy_max_diff = max(report.lossy_max_diff or 0, diff)
    quality = psnr(out, exp)
    if quality != float("inf"):
        lowest = quality if report.lossy_min_psnr is None else min(report.lossy_min_psnr, quality)
        report.lossy_min_psnr = round(lowest, 2)
    if torch.equal(out, written):
        return None
    off = int((out.int() - written.int()).abs().max())
    return "approximate", (f"differs from the recomputed protection encoded as {fmt.spec} by up to {off} (PSNR "
                           f"{psnr(out, written):.1f} dB); from the protection itself by up to {diff} "
                           f"(PSNR {quality:.1f} dB)")


def _classify(protection: Protection, pairs: list[tuple[str, Record, Record, OutputFormat]], options: dict[str, Any],
              keep_fields: tuple[str, ...], device: str, report: VerifyReport) -> None:
    """Compare each pair (``(shown file, protected, clean, output format)``) with the clean sample and the
    recomputed protection of its images, and sort it into ``report``: a sample with a tampered image is
    tampered, else one with a clean image unprotected, else (written lossy) one that differs approximate."""
    labelled = needs_labels(protection)
    ready: list[tuple[str, Record, list[tuple[str, torch.Tensor, torch.Tensor]], Any, str | None, OutputFormat]] = []
    for file, p, c, fmt in pairs:
        try:
            images, label, text = _images(protection, p, c, report.kind, options, keep_fields, fmt.extension)
            reason = check_label(protection, label) if labelled else None
            if reason is not None:
                raise UEDatasetsError(reason)
            tensors = []
            for name, out, clean in images:
                try:
                    tensors.append((name, image_tensor(out), image_tensor(clean)))
                except UEDatasetsError as e:
                    raise UEDatasetsError(f"image {name!r}: {e}") from None
        except UEDatasetsError as e:
            report.tampered.append(SampleFinding(file, p.key, str(e)))
            continue
        ready.append((file, p, tensors, label, text, fmt))
    flat = [(clean, label, p.key, text) for _, p, tensors, label, text, _ in ready for _, _, clean in tensors]
    if not flat:
        return
    expected = iter(protect_batch(protection, [clean for clean, _, _, _ in flat],
                                  labels=[int(label) for _, label, _, _ in flat] if labelled else None,
                                  keys=[key for _, _, key, _ in flat], device=device,
                                  unfitted="pass",  # a sample a noise bank lacks is expected unchanged
                                  texts=[text for *_, text in flat] if needs_texts(protection) else None))
    for file, p, tensors, _, _, fmt in ready:
        report.checked += 1
        report.lossy += int(not fmt.lossless)
        wrong, unchanged = [], True
        for (name, out, clean), exp in zip(tensors, expected):
            verdict = _verdict(out, exp, clean) if fmt.lossless else _lossy_verdict(out, exp, clean, fmt, report)
            unchanged = unchanged and torch.equal(exp, clean)
            if verdict is not None:
                wrong.append((verdict[0], f"image {name!r}: {verdict[1]}"))
        if not wrong:
            report.protected += 1
            report.unchanged += int(unchanged)
            report.lossy_exact += int(not fmt.lossless)
            continue
        which, reason = min(wrong, key=lambda w: ("tampered", "unprotected", "approximate").index(w[0]))
        getattr(report, which).append(SampleFinding(file, p.key, reason))


def _pairs(protected: Iterable[tuple[Id, Record]], clean: Iterator[tuple[Id, Record]],
           chosen: set[Id]) -> Iterator[tuple[Id, Record, Record | None]]:
    """Each chosen protected record with its clean record (``None`` when the clean source has fewer of
    that key). Both sources are read once, in order; clean records read ahead wait for their match, so
    memory grows only where the two orders differ."""
    waiting: dict[Id, list[Record]] = {}
    for key, p in protected:
        if key not in chosen:
            continue
        while not waiting.get(key):
            found = next(clean, None)
            if found is None:
                break
            if found[0] in chosen:
                waiting.setdefault(found[0], []).append(found[1])
        yield key, p, waiting[key].pop(0) if waiting.get(key) else None


def _read_output(reader: _Reader, shown: Callable[[str], str], report: VerifyReport) -> tuple[list[Id], list[str]]:
    """The ids of the output's samples and its readable inputs; an input that cannot be read is a finding
    under ``files``, a sample that cannot be read one under ``tampered``."""
    published: list[Id] = []
    readable: list[str] = []
    for src in reader.inputs:
        found: list[Id] = []
        try:
            for unit, r in reader.read(src):
                if isinstance(r, SampleError):
                    report.tampered.append(SampleFinding(shown(unit), r.key, r.reason))
                else:
                    found.append((unit, r.key))
        except (UEDatasetsError, OSError) as e:
            report.files.append(Finding(shown(reader.unit(src, src)), "", f"cannot be read ({e})"))
            continue
        published += found
        readable.append(src)
    return published, readable


def _formats(kind: str, output: Source, report: VerifyReport) -> Callable[[str], OutputFormat]:
    """The output format of each unit, as its stats record it; an unknown one is a finding under ``files``
    (its samples are then read as PNG)."""
    spec_of = written_formats(kind, output)
    parsed: dict[str, OutputFormat] = {}

    def format_of(unit: str) -> OutputFormat:
        spec = spec_of(unit)
        if spec not in parsed:
            try:
                parsed[spec] = OutputFormat.parse(spec)
            except UEDatasetsError as e:
                report.files.append(Finding(HF_STATS if kind == "hf" else unit, "settings.format", str(e)))
                parsed[spec] = OutputFormat()
        return parsed[spec]

    return format_of


def _check_samples(protection: Protection, output: Source, clean: Source, sample: int | None,
                   options: dict[str, Any], keep_fields: tuple[str, ...], device: str, seed: int, progress: bool,
                   report: VerifyReport) -> None:
    """Match the samples of ``output`` and ``clean`` and compare the chosen ones (see the module docstring)."""
    kind = report.kind
    name = posixpath.basename(output.urls[0].rstrip("/"))

    def shown(unit: str) -> str:
        """The file (or dataset and split) a finding names: never a path of this machine."""
        return name + unit if kind == "hf" else unit

    skipped = skipped_keys(kind, output)
    format_of = _formats(kind, output, report)
    out_reader, clean_reader = _Reader(kind, output, options, skipped), _Reader(kind, clean, options)
    source_ids = [i for i, _ in clean_reader.ids(clean_reader.inputs)]  # errors here are the caller's
    published, readable = _read_output(out_reader, shown, report)
    if kind == "hf" and not readable:
        return
    in_output, in_source = set(published), set(source_ids)
    read = {out_reader.unit(src, src) for src in readable} if kind != "hf" else {u for u, _ in published}
    broken = {out_reader.unit(src, src) for src in out_reader.inputs} - read if kind != "hf" else set()
    report.samples = len(published)
    report.foreign = [SampleFinding(shown(u), k, "key not in the clean source") for u, k in published
                      if (u, k) not in in_source]
    for i in source_ids:
        if i in in_output or i[0] in broken:  # an unreadable file is reported as such
            continue
        if i in skipped:
            report.missing.append(SampleFinding(shown(i[0]), i[1], f"skipped at protect time: {skipped[i]}"))
        else:
            report.absent.append(SampleFinding(shown(i[0]), i[1], "not in the output, and its stats do not list it as "
                                               "skipped" if i[0] in read else "its file is not in the output"))
    common = list(dict.fromkeys(i for i in published if i in in_source))
    chosen = set(common if sample is None or sample >= len(common) else random.Random(seed).sample(common, sample))
    pairs = _pairs(out_reader.ids(readable), clean_reader.ids(clean_reader.inputs), chosen)
    batch: list[tuple[str, Record, Record, OutputFormat]] = []
    with progress_bar(total=len(chosen), unit="sample", desc="verify", disable=not progress) as bar:
        for (unit, key), p, c in pairs:
            bar.update(1)
            if c is None:
                report.foreign.append(SampleFinding(shown(unit), key, "key appears more often than in the clean source"))
                continue
            batch.append((shown(unit), p, c, format_of(unit)))
            if len(batch) == BATCH:
                _classify(protection, batch, options, keep_fields, device, report)
                batch = []
        _classify(protection, batch, options, keep_fields, device, report)


def verify(
    protection: Protection | str | os.PathLike[str],
    protected: str,
    clean: str | Sequence[str] | None = None,
    sample: int | None = None,
    *,
    label_field: str | None = None,
    image_field: str | None = None,
    key_field: str | None = None,
    keep_fields: str | Sequence[str] = (),
    text_field: str | None = None,
    class_names: Sequence[str] = (),
    template: str | None = None,
    device: str = "cpu",
    encoder: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> VerifyReport:
    """Check that ``protected`` is protected by ``protection`` and that nothing in it should stay private.

    Args:
        protection: a `Protection`, or an artifact directory (loaded and its digest checked).
        protected: the output of ``ue-datasets protect`` about to be published (any form it writes).
        clean: the source it was protected from (one or several inputs, as protect's ``--input``);
            without it pixels are not checked.
        sample: check this many samples, a random subset drawn with ``seed`` (default: all).
        label_field, image_field, key_field, keep_fields: as given to ``ue-datasets protect``
            (``image_field`` and ``keep_fields`` name fields of the clean samples).
        text_field, class_names, template: text protections (T2UE) only: as given to protect (the
            caption field defaults to ``txt`` for shards; a dataset's ``ClassLabel`` label column gives
            its class names).
        device: where the tensor core recomputes protections.
        encoder: clusters protections only: where the surrogate encoder's weights are now (an encoder
            spec, as for ``protect --encoder``).
        progress: show a progress bar on stderr.

    Raises:
        UEDatasetsError: an unreadable artifact or clean source, a clean source of another form.
    """
    artifact = None if isinstance(protection, Protection) else str(protection)
    protection = as_protection(protection)
    if encoder is not None:
        from .clusters import use_encoder

        protection = use_encoder(protection, encoder, device=device)
    if sample is not None and sample < 1:
        raise UEDatasetsError(f"sample must be >= 1, got {sample}")
    source = resolve(protected)
    report = VerifyReport(protected, protection.public(), source.kind, pixels_checked=clean is not None)
    report.files, report.samples = check_files(protected, source, protection)
    spec_of = written_formats(source.kind, source)
    report.formats = sorted({spec_of(output_name(url)) for url in source.urls})
    clean_list = field_names(clean) if clean is not None else ()
    if clean is not None:
        clean_source = resolve(list(clean_list))
        if clean_source.kind != source.kind:
            raise UEDatasetsError(f"{' '.join(clean_list)} is {KIND_NAMES[clean_source.kind]} and {protected} is "
                                  f"{KIND_NAMES[source.kind]}; give the source the output was protected from")
        texts = TextSource(text_field, tuple(class_names), template)
        if clean_source.kind == "wds":
            texts = shard_texts(texts)
        elif clean_source.kind == "hf" and texts.field is None and not texts.class_names and needs_texts(protection):
            texts = replace(texts, class_names=_dataset_class_names(clean_source.urls[0], label_field or "label"))
        if needs_texts(protection):
            texts.check_resolvable()
        options = {"image_field": image_field, "label_field": label_field, "key_field": key_field, "texts": texts}
        _check_samples(protection, source, clean_source, sample, options, field_names(keep_fields), device, seed,
                       progress, report)
    cleans = {"the clean source's path" + (f" ({i + 1} of {len(clean_list)})" if len(clean_list) > 1 else ""): c
              for i, c in enumerate(clean_list)}
    look_for = local_needles({"the protected output's path": protected, **cleans,
                              "the artifact directory's path": artifact}, protection.digest)
    report.leaks = scan(protected, look_for)
    return report
