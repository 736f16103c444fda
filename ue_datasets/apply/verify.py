"""Check, before publishing, that a protected output is really protected by an artifact and leaks nothing.

`verify` does three things:

* **files**: each output file checks out against its stats (size and sha256) and was written with
  this artifact (its ``protection.id``); a file with no stats, or listed by none, is reported;
* **samples** (with the clean source): samples are matched by file (a shard or parquet file's output
  name, a dataset's split) and key; the protection of each clean image is recomputed through the
  tensor core, with the protected sample's label and key, and compared pixel for pixel with the
  published image: equal is *protected* (an image the protection leaves as it is, as a partial
  protection does for unselected samples, included), the clean image instead is *unprotected*, anything
  else *tampered*; a key the clean source lacks is *foreign*, a clean key the output lacks is *missing*
  (informational: skipped at protect time). The first image of each sample is checked.
* **leaks** (`ue_datasets.apply.leaks`): local paths, the artifact's digest or files, lock and partial
  files in anything that would be published.
"""

from __future__ import annotations

import os
import posixpath
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import torch

from ..artifact import Protection, as_protection
from ..errors import UEDatasetsError
from ..progress import progress_bar
from .commit import LOCK_SUFFIX, PARTIAL_INFIX, checks_out, read_json, stats_url
from .core import check_label, needs_labels, protect_batch
from .images import image_tensor
from .leaks import Finding, local_needles, scan
from .records import Record, iter_records
from .shards import output_name
from .sources import HF_STATS, KIND_NAMES, Source, resolve

#: Samples per call of the tensor core.
BATCH = 64
#: Findings of each kind listed by `VerifyReport.summary`.
SHOWN = 5

Id = tuple[str, str]


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
    recomputed protection, ``unchanged`` of those left as they are by the protection (unselected by a
    partial protection). ``missing`` is informational; every other list is a problem.
    """

    output: str
    protection: dict[str, str]
    kind: str
    pixels_checked: bool
    samples: int = 0
    checked: int = 0
    protected: int = 0
    unchanged: int = 0
    unprotected: list[SampleFinding] = field(default_factory=list)
    tampered: list[SampleFinding] = field(default_factory=list)
    foreign: list[SampleFinding] = field(default_factory=list)
    missing: list[SampleFinding] = field(default_factory=list)
    files: list[Finding] = field(default_factory=list)
    leaks: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unprotected or self.tampered or self.foreign or self.files or self.leaks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def summary(self) -> str:
        """A few lines for people: the verdict, the counts, the first findings of each kind."""
        problems = sum(map(len, (self.unprotected, self.tampered, self.foreign, self.files, self.leaks)))
        lines = [f"verify {self.output} ({KIND_NAMES[self.kind]}, protection {self.protection['id']}): "
                 + ("OK" if self.ok else f"{problems} problem(s)")]
        if self.pixels_checked:
            lines.append(f"  {self.checked} of {self.samples} samples checked pixel for pixel: {self.protected} "
                         f"protected ({self.unchanged} left unchanged by the protection)")
        else:
            lines.append(f"  {self.samples} samples; pixels not checked (give the clean source to check them)")
        for name in ("unprotected", "tampered", "foreign", "missing", "files", "leaks"):
            found = getattr(self, name)
            if found:
                note = " (informational: samples not in the output, as --on-error skip leaves them)" \
                    if name == "missing" else ""
                lines.append(f"  {name}: {len(found)}{note}")
                for f in found[:SHOWN]:
                    where = f.key if isinstance(f, SampleFinding) else f.where
                    lines.append(f"    {f.file}" + (f" {where}" if where else "") + f": {f.reason}")
                if len(found) > SHOWN:
                    lines.append(f"    ... and {len(found) - SHOWN} more (all of them in the JSON report)")
        return "\n".join(lines)


def _check_files(source: Source, protection: Protection) -> tuple[list[Finding], int]:
    """Findings on the output's files against their stats, and the samples the stats count."""
    if source.kind == "hf":
        return _check_dataset(source.urls[0], protection)
    findings, samples = [], 0
    for url in source.urls:
        name = posixpath.basename(url)
        stats = read_json(stats_url(url))
        if stats is None:
            findings.append(Finding(name, "", "no stats file beside it: not written by ue-datasets protect"))
            continue
        findings += _against_stats(name, stats, protection)
        if stats.get("output") != name:
            findings.append(Finding(name, "output", f"its stats are those of {stats.get('output')!r}"))
        elif not checks_out(url, stats):
            findings.append(Finding(name, "", "size or sha256 differs from its stats: changed after protect"))
        else:
            samples += int(stats.get("written", 0))
    return findings, samples


def _against_stats(name: str, stats: dict[str, Any], protection: Protection) -> list[Finding]:
    recorded = stats.get("protection")
    other = recorded.get("id") if isinstance(recorded, dict) else None
    if other != protection.id:
        return [Finding(name, "protection.id", f"written with another protection ({other})")]
    return []


def _check_dataset(root: str, protection: Protection) -> tuple[list[Finding], int]:
    stats = read_json(posixpath.join(root, HF_STATS))
    if stats is None or not isinstance(stats.get("files"), dict):
        return [Finding(HF_STATS, "", "missing or unreadable: not a dataset written by ue-datasets protect")], 0
    findings = _against_stats(HF_STATS, stats, protection)
    if stats.get("complete", True) is not True:
        findings.append(Finding(HF_STATS, "complete", "the dataset's commit was interrupted; rerun protect"))
    for name, digest in stats["files"].items():
        if not checks_out(posixpath.join(root, name), digest):
            findings.append(Finding(name, "", "missing, or its size or sha256 differs from the stats: "
                                              "changed after protect"))
    fs, path = fsspec.core.url_to_fs(root)
    for found in sorted(fs.find(path)):
        name = posixpath.relpath(found, path)
        if name != HF_STATS and name not in stats["files"] and not (
                name.endswith(LOCK_SUFFIX) or PARTIAL_INFIX in name):  # those are leaks, reported as such
            findings.append(Finding(name, "", f"not listed in {HF_STATS}: not written by ue-datasets protect"))
    return findings, int(stats.get("written", 0))


def _unit(kind: str, src: str, record: Record) -> str:
    """What a sample is matched within: its file's output name, or its split (``[train]``) in a dataset."""
    return record.source[len(src):] if kind == "hf" else output_name(record.source)


def _shown(kind: str, src: str, record: Record) -> str:
    """The file (or dataset and split) a finding names: never a path of this machine."""
    unit = _unit(kind, src, record)
    return posixpath.basename(src.rstrip("/")) + unit if kind == "hf" else unit


def _classify(protection: Protection, pairs: list[tuple[Record, Record]], src: str, device: str,
              report: VerifyReport) -> None:
    """Recompute the protection of each clean image (``pairs``: protected and clean records) and sort
    each pair into ``report``."""
    labelled = needs_labels(protection)
    ready: list[tuple[Record, torch.Tensor, torch.Tensor]] = []
    for p, c in pairs:
        try:
            reason = check_label(protection, p.label) if labelled else None
            if reason is not None:
                raise UEDatasetsError(reason)
            out, clean = image_tensor(p.image), image_tensor(c.image)
        except UEDatasetsError as e:
            report.tampered.append(SampleFinding(_shown(report.kind, src, p), p.key, str(e)))
            continue
        ready.append((p, out, clean))
    if not ready:
        return
    expected = protect_batch(protection, [c for _, _, c in ready],
                             labels=[int(p.label) for p, _, _ in ready] if labelled else None,
                             keys=[p.key for p, _, _ in ready], device=device)
    for (p, out, clean), exp in zip(ready, expected):
        report.checked += 1
        file = _shown(report.kind, src, p)
        if torch.equal(out, exp):
            report.protected += 1
            report.unchanged += int(torch.equal(exp, clean))
        elif torch.equal(out, clean):
            report.unprotected.append(SampleFinding(file, p.key, "the published image is the clean image"))
        elif out.shape != exp.shape:
            report.tampered.append(SampleFinding(file, p.key, f"image is {tuple(out.shape)} (C, H, W), the "
                                                              f"protected image would be {tuple(exp.shape)}"))
        else:
            diff = (out.int() - exp.int()).abs()
            report.tampered.append(SampleFinding(file, p.key, f"{int((diff > 0).sum())} of {diff.numel()} values "
                                                              f"differ from the protection of the clean image "
                                                              f"(by up to {int(diff.max())})"))


def _pairs(protected: Iterable[Record], clean: Iterator[Record], chosen: set[Id], pid: Callable[[Record], Id],
           cid: Callable[[Record], Id]) -> Iterator[tuple[Record, Record | None]]:
    """Each chosen protected record with its clean record (``None`` when the clean source has fewer of
    that key). Both sources are read once, in order; clean records read ahead wait for their match, so
    memory grows only where the two orders differ."""
    waiting: dict[Id, list[Record]] = {}
    for p in protected:
        key = pid(p)
        if key not in chosen:
            continue
        while not waiting.get(key):
            c = next(clean, None)
            if c is None:
                break
            if cid(c) in chosen:
                waiting.setdefault(cid(c), []).append(c)
        yield p, waiting[key].pop(0) if waiting.get(key) else None


def _check_samples(protection: Protection, output: str, clean: str, sample: int | None, options: dict[str, Any],
                   device: str, seed: int, progress: bool, report: VerifyReport) -> None:
    """Match the samples of ``output`` and ``clean`` and compare the chosen ones (see the module docstring)."""
    kind = report.kind
    pid = lambda r: (_unit(kind, output, r), r.key)  # noqa: E731
    cid = lambda r: (_unit(kind, clean, r), r.key)  # noqa: E731
    published = [(pid(r), _shown(kind, output, r)) for r in iter_records(output, **options)]
    source_ids = [(cid(r), _shown(kind, clean, r)) for r in iter_records(clean, **options)]
    in_output, in_source = {i for i, _ in published}, {i for i, _ in source_ids}
    report.samples = len(published)
    report.foreign = [SampleFinding(shown, i[1], "key not in the clean source") for i, shown in published
                      if i not in in_source]
    report.missing = [SampleFinding(shown, i[1], "not in the output") for i, shown in source_ids
                      if i not in in_output]
    common = list(dict.fromkeys(i for i, _ in published if i in in_source))
    chosen = set(common if sample is None or sample >= len(common) else random.Random(seed).sample(common, sample))
    labelled = needs_labels(protection)
    records = iter_records(output, labels=labelled, **options)
    pairs = _pairs(records, iter(iter_records(clean, **options)), chosen, pid, cid)
    batch: list[tuple[Record, Record]] = []
    with progress_bar(total=len(chosen), unit="sample", desc="verify", disable=not progress) as bar:
        for p, c in pairs:
            bar.update(1)
            if c is None:
                report.foreign.append(SampleFinding(_shown(kind, output, p), p.key,
                                                    "key appears more often than in the clean source"))
                continue
            batch.append((p, c))
            if len(batch) == BATCH:
                _classify(protection, batch, output, device, report)
                batch = []
        _classify(protection, batch, output, device, report)


def verify(
    protection: Protection | str | os.PathLike[str],
    protected: str,
    clean: str | None = None,
    sample: int | None = None,
    *,
    label_field: str | None = None,
    image_field: str | None = None,
    key_field: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> VerifyReport:
    """Check that ``protected`` is protected by ``protection`` and that nothing in it should stay private.

    Args:
        protection: a `Protection`, or an artifact directory (loaded and its digest checked).
        protected: the output of ``ue-datasets protect`` about to be published (any form it writes).
        clean: the source it was protected from; without it pixels are not checked.
        sample: check this many samples, a random subset drawn with ``seed`` (default: all).
        label_field, image_field, key_field: as given to ``ue-datasets protect``.
        device: where the tensor core recomputes protections.
        progress: show a progress bar on stderr.

    Raises:
        UEDatasetsError: an unreadable artifact or source, a clean source of another form, a sample
            whose image or label cannot be read at all (named by file and key).
    """
    artifact = None if isinstance(protection, Protection) else str(protection)
    protection = as_protection(protection)
    if sample is not None and sample < 1:
        raise UEDatasetsError(f"sample must be >= 1, got {sample}")
    source = resolve(protected)
    report = VerifyReport(protected, protection.public(), source.kind, pixels_checked=clean is not None)
    report.files, report.samples = _check_files(source, protection)
    if clean is not None:
        other = resolve(clean).kind
        if other != source.kind:
            raise UEDatasetsError(f"{clean} is {KIND_NAMES[other]} and {protected} is {KIND_NAMES[source.kind]}; "
                                  "give the source the output was protected from")
        options = {"image_field": image_field, "label_field": label_field, "key_field": key_field}
        _check_samples(protection, protected, clean, sample, options, device, seed, progress, report)
    look_for = local_needles({"the protected output's path": protected, "the clean source's path": clean,
                              "the artifact directory's path": artifact}, protection.digest)
    report.leaks = scan(protected, look_for)
    return report
