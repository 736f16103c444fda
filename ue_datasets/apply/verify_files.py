"""`verify`'s checks of an output's files: each against its stats and the artifact's id, any other file
in the output folder, and what the stats list as skipped."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

import fsspec

from ..artifact import Protection
from .commit import LOCK_SUFFIX, PARTIAL_INFIX, checks_out, read_json, stats_url
from .leaks import Finding
from .shards import output_name
from .sources import HF_STATS, Source

#: A sample's identity in an output: its file's output name (a dataset's split) and its key.
Id = tuple[str, str]


def _leftover(name: str) -> bool:
    """Whether a file is a lock or partial file (a leak, reported as such)."""
    return name.endswith(LOCK_SUFFIX) or PARTIAL_INFIX in name


def check_files(output: str, source: Source, protection: Protection) -> tuple[list[Finding], int]:
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
    return findings + _stray_files(output, source.urls), samples


def _stray_files(output: str, urls: list[str]) -> list[Finding]:
    """The files of an output folder, at any depth, that are neither one of its output files nor their stats."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.isdir(root):
        return []
    known = {fsspec.core.url_to_fs(u)[1] for url in urls for u in (url, stats_url(url))}
    return [Finding(posixpath.relpath(found, root), "", "not an output file or the stats of one: not written by "
                                                        "ue-datasets protect")
            for found in sorted(fs.find(root))
            if found not in known and not _leftover(posixpath.basename(found))]


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
        if name != HF_STATS and name not in stats["files"] and not _leftover(name):
            findings.append(Finding(name, "", f"not listed in {HF_STATS}: not written by ue-datasets protect"))
    return findings, int(stats.get("written", 0))


def _format_of(stats: dict[str, Any] | None) -> str:
    """The output format its stats record (``settings.format``; PNG when absent, as before formats existed)."""
    settings = (stats or {}).get("settings")
    spec = settings.get("format", "png") if isinstance(settings, dict) else "png"
    return spec if isinstance(spec, str) else repr(spec)


def written_formats(kind: str, source: Source) -> Callable[[str], str]:
    """The spec of the output format each unit (a file's output name; a dataset's split) was written in,
    as its stats record it."""
    if kind == "hf":
        spec = _format_of(read_json(posixpath.join(source.urls[0], HF_STATS)))
        return lambda unit: spec
    specs = {output_name(url): _format_of(read_json(stats_url(url))) for url in source.urls}
    return lambda unit: specs.get(unit, "png")


def skipped_keys(kind: str, source: Source) -> dict[Id, str]:
    """What the output's stats list as skipped at protect time: ``{(file or split, key): reason}``."""
    if kind == "hf":
        stats = read_json(posixpath.join(source.urls[0], HF_STATS)) or {}
        name = str(stats.get("input", ""))
        entries = [(str(s.get("source", ""))[len(name):], s) for s in stats.get("skipped") or []
                   if isinstance(s, dict)]
    else:
        entries = [(output_name(url), s) for url in source.urls
                   for s in (read_json(stats_url(url)) or {}).get("skipped") or [] if isinstance(s, dict)]
    return {(unit, str(s.get("key"))): str(s.get("reason", "")) for unit, s in entries}
