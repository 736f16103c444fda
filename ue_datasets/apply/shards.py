"""Shard-level, resumable file rewriting shared by the webdataset and parquet rewriters.

The model is img2dataset's: one input file gives one output file of the same name, written through
the commit protocol of `ue_datasets.apply.commit` (one writer per output under a lock, a partial file
of its own, ``STEM_stats.json`` with the output's size and sha256, then the rename). A rerun skips
files that check out against their stats and redoes the rest, so a killed run resumes and ends with
the same bytes as an uninterrupted one. Files are independent, so several processes (spawned, so CUDA
works in them), or several runs, can share the work; a file another run is writing is waited for.
"""

from __future__ import annotations

import posixpath
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec

from ..artifact import Protection
from ..errors import SourceError, UEDatasetsError
from ..progress import progress_bar
from ..version import __version__
from .commit import (
    OutputBusy,
    OutputLock,
    checks_out,
    discard,
    final_url,
    output_error,
    partial_url,
    read_json,
    remove_partials,
    rename,
    source_identity,
    stats_url,
    write_hashed,
    write_json,
)
from .core import UNFITTED, needs_keys, selected
from .distribute import distributor_for, serial
from .encoded import ON_ERROR, field_names
from .images import DEFAULT_MAX_PIXELS, PNG_LEVEL, OutputFormat
from .locations import check_output, check_output_name
from .texts import TextSource, check_template

if TYPE_CHECKING:
    from .ray import RayEngine

#: Names of the files the rewriters read and write: webdataset shards, parquet files.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIX = ".parquet"
#: Images per call of the tensor core in the rewriters.
DEFAULT_BATCH_SIZE = 256
#: Seconds between looks at files another run is writing.
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ShardOptions:
    """How samples are read and protected.

    Attributes:
        label_field: field or column holding the class id (webdataset ``cls``; ``label`` in tables).
        image_field: field or column holding the image; ``None``: every image field of a webdataset
            sample (by extension), ``image`` in tables.
        key_field: column of stable sample keys in tables (default: the row index in the file);
            webdataset samples always use ``__key__``.
        keep_fields: fields or columns passed through unprotected although they hold images
            (segmentation masks, say); every other image is protected or its sample fails.
        batch_size: samples per call of the tensor core.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        on_error: ``"fail"`` raises on the first bad sample; ``"skip"`` leaves it out and records
            its key and the reason in the stats.
        png_level: zlib level of the written PNGs (lossless at any level).
        format: how protected images are written (`ue_datasets.apply.images.OutputFormat` or its spec):
            ``"png"`` (default, lossless), ``"webp"`` (lossless) or ``"jpeg:Q"`` (lossy, quality Q);
            kept as its canonical spec. Webdataset image fields are named after its extension.
        max_pixels: an image that declares more pixels (width x height) is refused before decoding.
        unfitted: a sample the protection holds no noise for (a sample-wise noise bank fitted on other
            data): ``"error"`` fails it (or skips it under ``on_error="skip"``), ``"pass"`` writes it
            unprotected and counts it as ``unprotected`` in the stats.
        text_field: for protections that find noise by text (T2UE): the field or column of each
            sample's caption; default for shards: ``txt`` (webdataset's), unless ``class_names`` is given.
        class_names: names by class id: without ``text_field``, each sample's text is the prompt
            ``template`` makes from its label's name (read from ``label_field``).
        template: the prompt template, with ``{name}``; default: the protection's own
            (`ue_datasets.apply.texts.TextSource`).
    """

    label_field: str = "cls"
    image_field: str | None = None
    key_field: str | None = None
    keep_fields: tuple[str, ...] = ()
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str = "auto"
    on_error: str = "fail"
    png_level: int = PNG_LEVEL
    max_pixels: int = DEFAULT_MAX_PIXELS
    unfitted: str = "error"
    text_field: str | None = None
    class_names: tuple[str, ...] = ()
    template: str | None = None
    format: str = "png"

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise UEDatasetsError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.unfitted not in UNFITTED:
            raise UEDatasetsError(f"unfitted must be one of {UNFITTED}, got {self.unfitted!r}")
        if self.batch_size < 1:
            raise UEDatasetsError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise UEDatasetsError(f"max_pixels must be >= 1, got {self.max_pixels}")
        object.__setattr__(self, "format", OutputFormat.parse(self.format, self.png_level).spec)
        object.__setattr__(self, "keep_fields", field_names(self.keep_fields))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.template is not None:
            check_template(self.template)

    def replace(self, **changes: Any) -> ShardOptions:
        return ShardOptions(**{**asdict(self), **changes})

    @property
    def output_format(self) -> OutputFormat:
        """How protected images are written: `format` with `png_level`."""
        return OutputFormat.parse(self.format, self.png_level)

    @property
    def text_source(self) -> TextSource:
        """Where each sample's text comes from, as given (an adapter fills in its own default caption field)."""
        return TextSource(self.text_field, self.class_names, self.template)

    def settings(self) -> dict[str, Any]:
        """The options that decide an output's bytes (not batch size or device): a rerun with other
        settings redoes the output instead of resuming it. ``format`` is there only when it is not PNG,
        so that PNG outputs written before formats existed still resume."""
        return {"label_field": self.label_field, "image_field": self.image_field, "key_field": self.key_field,
                "keep_fields": list(self.keep_fields), "on_error": self.on_error, "png_level": self.png_level,
                "max_pixels": self.max_pixels, "unfitted": self.unfitted, **self.text_source.settings(),
                **({"format": self.format} if self.format != "png" else {})}


@dataclass
class ShardStats:
    """What happened to one file; written as ``STEM_stats.json`` beside it.

    ``input`` and ``output`` are file names (the output's is relative to the output folder), never
    paths of the machine that wrote them; ``bytes`` and ``sha256`` are the output file's, ``source``
    the input's size and modification time, ``settings`` the options that decide the bytes
    (`ShardOptions.settings`): a rerun keeps the file only when all of them still match. ``resumed``
    is set in what a run returns, for files it found complete.
    """

    input: str
    output: str
    samples: int = 0
    written: int = 0
    protected: int = 0
    unprotected: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    protection: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    sha256: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    ue_datasets_version: str = __version__
    resumed: bool = False

    def skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})


#: ``body(fileobj, stats) -> written keys``: writes one output file's bytes and counts into ``stats``.
Body = Callable[[Any, ShardStats], Sequence[str]]
#: ``rewrite(protection, in_url, out_url, options, progress, overwrite) -> stats dict``; module-level, so picklable.
Rewrite = Callable[..., dict[str, Any]]


def output_name(url: str) -> str:
    """The output file's base name: the input's, with ``.tar.gz``/``.tgz`` written as ``.tar``."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".tar"
    return name


def check_not_empty(stats: ShardStats, in_url: str, options: ShardOptions, reason: str) -> None:
    """A file that yielded no sample fails, or with ``on_error="skip"`` is recorded as skipped."""
    if stats.samples == 0 and not stats.skipped:
        if options.on_error == "fail":
            raise SourceError(in_url, reason)
        stats.skip("", reason)


def owned_stats(out_url: str, protection: Protection, overwrite: bool) -> dict[str, Any] | None:
    """The stats of an output this package wrote, ``None`` when there is none yet.

    Raises:
        UEDatasetsError: a file is under the output's name (or its stats name) that this package did
            not write; or the output was written with another protection (unless ``overwrite``).
    """
    fs, path = fsspec.core.url_to_fs(out_url)
    stats_file = stats_url(out_url)
    stats = read_json(stats_file)
    named = stats.get("output") if stats else None  # a name; a path in stats of earlier versions
    if not isinstance(named, str) or posixpath.basename(named) != posixpath.basename(path) or "protection" not in stats:
        if fs.exists(fsspec.core.url_to_fs(stats_file)[1]):
            raise UEDatasetsError(f"{stats_file}: exists and is not the stats file of this output; "
                                  "move it away or choose another output folder")
        if fs.exists(path):
            raise UEDatasetsError(f"{out_url}: exists and was not written by ue-datasets (it has no stats file); "
                                  "move it away or choose another output folder")
        return None
    other = stats["protection"].get("id") if isinstance(stats["protection"], dict) else None
    if other != protection.id and not overwrite:
        raise other_protection(out_url, other)
    return stats


def other_protection(url: str, other: object) -> UEDatasetsError:
    """The error for an output completed with another protection (one with another id)."""
    return UEDatasetsError(
        f"{url} was written with another protection ({other}); write to a new output or pass --overwrite "
        "(overwrite=True in Python). A protection fitted again gets a new id, even from the same key: protect "
        "with the artifact you saved (load_protection)")


def commit_file(
    protection: Protection, in_url: str, out_url: str, options: ShardOptions, overwrite: bool, body: Body
) -> dict[str, Any]:
    """Write one output file under the commit protocol, or return its stats when it is already complete.

    Claims the output (`OutputBusy` while another process holds it), then: an output that checks out
    against its stats, made from the same input with the same settings, is kept (``resumed``; redone
    with ``overwrite``); otherwise ``body`` writes it into a partial file of its own and it is
    committed (stats first, then the rename).
    """
    start = time.perf_counter()
    with OutputLock(out_url):
        done = owned_stats(out_url, protection, overwrite)
        source, settings = source_identity(in_url), options.settings()
        if (done is not None and not overwrite and done.get("source") == source
                and done.get("settings") == settings and checks_out(out_url, done)):
            return {**done, "resumed": True}
        stats = ShardStats(posixpath.basename(in_url.rstrip("/")), posixpath.basename(out_url.rstrip("/")),
                           protection=protection.public(), source=source, settings=settings)
        partial = partial_url(out_url)
        keys, digest = write_hashed(partial, lambda f: body(f, stats))
        try:
            stats.written = len(keys)
            covered = int(selected(protection, keys).sum()) if needs_keys(protection) else len(keys)
            stats.protected = covered - stats.unprotected
            stats.seconds = round(time.perf_counter() - start, 4)
            stats.bytes, stats.sha256 = digest["bytes"], digest["sha256"]
            write_json(stats_url(out_url), asdict(stats))
            rename(partial, out_url)
        except BaseException:
            discard(partial)
            raise
    return asdict(stats)


def plan(inputs: Sequence[str], output_dir: str, patterns: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Pair each input with its output URL in ``output_dir``, refusing any output that aliases an input.

    Args:
        inputs: input file URLs.
        output_dir: the output folder.
        patterns: the input as the user gave it (files, folders, globs), to refuse outputs it would read
            back; default: ``inputs``.
    """
    if isinstance(inputs, str):
        raise UEDatasetsError(f"inputs must be a list of files, got the string {inputs!r}")
    check_output_name(output_dir)  # before "" + "/" + name makes a file of the root folder
    if output_dir.rstrip("/").endswith((*SHARD_SUFFIXES, PARQUET_SUFFIX)):
        raise UEDatasetsError(f"{output_dir}: the output is a folder (each output file keeps its input's name), "
                              "not a file name; give a folder such as protected/")
    pairs, seen = [], {}
    for url in inputs:
        name = output_name(url)
        if name in seen:
            raise UEDatasetsError(f"inputs {seen[name]} and {url} would both be written as {name}")
        seen[name] = url
        pairs.append((url, output_dir.rstrip("/") + "/" + name))
    check_output(list(patterns or inputs), list(inputs), [out for _, out in pairs])
    return pairs


def _sweep_partials(outputs: list[str], output_dir: str) -> None:
    """Remove partial files that killed runs left for ``outputs`` (and their stats), each under the
    output's lock, so that a live writer's partial file is never touched. One listing of the folder."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    try:
        names = {posixpath.basename(n) for n in fs.ls(path, detail=False)}
    except OSError:
        return
    owners = {posixpath.basename(u): u for u in outputs}
    owners.update({posixpath.basename(stats_url(u)): u for u in outputs})
    for name in names:
        final = posixpath.basename(final_url(name))
        if final == name or final not in owners:
            continue
        try:
            with OutputLock(owners[final]):
                remove_partials(output_dir.rstrip("/") + "/" + final)
        except OutputBusy:
            continue


def run(
    rewrite: Rewrite,
    protection: Protection,
    inputs: Sequence[str],
    output_dir: str,
    options: ShardOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    patterns: Sequence[str] | None = None,
    engine: str | RayEngine = "local",
) -> list[dict[str, Any]]:
    """Rewrite every input file into ``output_dir`` with ``rewrite``, resuming finished ones.

    Files another run is writing are left to it and waited for, then taken as it left them.

    Args:
        workers: with the local engine, processes each rewriting whole files.
        engine: ``"local"`` (this machine: one process, or ``workers`` processes), ``"ray"`` or a
            `ue_datasets.apply.ray.RayEngine`: one Ray task per file (`ue_datasets.apply.distribute`).

    Returns:
        The stats of every file, in input order (``resumed: True`` for files done earlier).

    Raises:
        UEDatasetsError: an output aliases an input, is not this package's, or was completed with
            another protection (unless ``overwrite``); with Ray, files whose tasks failed (all named).
    """
    distributor_for(engine, workers)  # fails at once, before any work, when the engine cannot run
    pairs = plan(inputs, output_dir, patterns)
    fs, out_path = fsspec.core.url_to_fs(output_dir)
    if fs.exists(out_path) and not fs.isdir(out_path):
        raise UEDatasetsError(f"{output_dir}: is a file, not an output folder")
    for _, dst in pairs:  # fail before any work on outputs that cannot be written (checked again under the lock)
        owned_stats(dst, protection, overwrite)
    try:
        fs.makedirs(out_path, exist_ok=True)
    except OSError as e:
        raise output_error(output_dir, e) from None
    results: dict[int, dict[str, Any]] = {}
    pending = list(range(len(pairs)))
    distributor = distributor_for(engine, workers, len(pairs))
    bar = progress_bar(total=len(pairs), unit="file", desc="protect", disable=not progress)
    told = False
    try:
        while pending:
            busy: list[int] = []
            jobs = [(i, *pairs[i]) for i in pending]
            for i, outcome in distributor(rewrite, protection, jobs, options, overwrite, progress):
                if isinstance(outcome, OutputBusy):
                    if not outcome.waitable:
                        raise outcome
                    busy.append(i)
                    continue
                results[i] = outcome
                bar.update(1)
            pending = sorted(busy)
            if pending:
                if not told:
                    names = ", ".join(posixpath.basename(pairs[i][1]) for i in pending[:3])
                    print(f"ue-datasets: waiting for {len(pending)} file(s) another run is writing ({names}...)",
                          file=sys.stderr)
                    told = True
                time.sleep(POLL_SECONDS)
                distributor = serial
                overwrite = False  # what another run finished meanwhile is this run's to keep, not to redo
    finally:
        bar.close()
    _sweep_partials([dst for _, dst in pairs], output_dir)
    mixed = [dst for _, dst in pairs if ((read_json(stats_url(dst)) or {}).get("protection") or {}).get("id")
             != protection.id]
    if mixed:  # a concurrent run with another protection (and --overwrite) replaced some files
        names = ", ".join(posixpath.basename(d) for d in mixed[:3])
        raise UEDatasetsError(f"{output_dir}: {len(mixed)} file(s) ({names}...) were written meanwhile by another "
                              "run with another protection; run one protection per output folder")
    return [results[i] for i in range(len(pairs))]
