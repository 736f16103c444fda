"""webdataset adapters: a pipeline stage and resumable shard-to-shard rewriting.

Samples are handled as webdataset's raw samples, ``{"__key__": str, "<ext>": bytes, ...}``, before any
decoding: no field but the image is ever decoded, so nothing from an untrusted shard is unpickled or
executed, and every other field is passed on byte for byte. The image (the first of
`IMAGE_EXTENSIONS`, or ``image_field``) is replaced, in place, by a lossless ``png`` field.

Shard rewriting (`protect_shards`) writes one output shard per input shard under the same name (a
``.tar.gz`` input gives a ``.tar``), in the same sample and key order, through fsspec URLs. Each shard
is written as ``NAME.partial`` and renamed when complete; a ``NAME_stats.json`` written last marks it
done, so a rerun skips finished shards and redoes the rest.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec

from ..artifact import Protection
from ..errors import SampleError, SourceError, UEDatasetsError
from .core import needs_labels
from .encoded import Item, batched, protect_encoded_stream
from .images import IMAGE_EXTENSIONS
from .shards import ShardOptions, ShardStats, atomic_write, check_not_empty, finish, run

OUTPUT_FIELD = "png"


# --------------------------------------------------------------------------- tar reading and writing


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key runs to the first dot of the base name, the rest is the extension."""
    directory, base = posixpath.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext


def _end_tracking_tarinfo() -> tuple[type[tarfile.TarInfo], dict[str, str]]:
    """A TarInfo class that records why header reading stopped.

    Stream-mode ``tarfile`` ends quietly at a missing or partial header; only a zero block
    (``EOFHeaderError``) is the real end-of-archive marker, anything else means a cut or corrupt tar.
    """
    state = {"end": ""}

    class _TarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as e:
                state["end"] = type(e).__name__
                raise

    return _TarInfo, state


def read_samples(fileobj: Any, source: str) -> Iterator[dict[str, Any]]:
    """Group a tar stream's regular files into samples ``{"__key__", "__url__", ext: bytes}``.

    Each sample is yielded as soon as the next key's header is read, so a cut never costs a sample
    that was complete before it.

    Raises:
        SourceError: the tar is unreadable, cut or corrupt (the message names the last complete
            sample), or a file name has no extension.
    """
    current: dict[str, Any] | None = None
    last_key = None
    tarinfo, state = _end_tracking_tarinfo()
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=tarinfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_name(member.name)
                if parts is None:  # not part of any sample (a README...): webdataset skips these too
                    continue
                key, ext = parts
                if current is not None and current["__key__"] != key:
                    yield current
                    last_key, current = current["__key__"], None
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is None:
                    current = {"__key__": key, "__url__": source}
                elif ext in current:
                    raise SourceError(source, f"sample {key!r}: duplicate field {ext!r}")
                current[ext] = data
        if state["end"] != "EOFHeaderError":
            raise tarfile.ReadError(f"no end-of-archive marker ({state['end'] or 'stream ended'})")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f"after sample {last_key!r}" if last_key is not None else "before the first complete sample"
        raise SourceError(source, f"truncated or corrupt tar {where} ({type(e).__name__}: {e})") from None
    if current is not None:
        yield current


def write_samples(fileobj: Any, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples as a reproducible tar (mtime 0, mode 0444, no owner); returns the count."""
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


# --------------------------------------------------------------------------- protecting samples


def image_field_of(sample: dict[str, Any], image_field: str | None) -> str:
    """The field holding a raw sample's image: ``image_field``, or the first of `IMAGE_EXTENSIONS`."""
    if image_field is not None:
        if image_field not in sample:
            raise UEDatasetsError(f"no image field {image_field!r} (fields: {_fields(sample)})")
        return image_field
    lowered = {k.lower(): k for k in sample if not k.startswith("__")}
    for ext in IMAGE_EXTENSIONS:
        if ext in lowered:
            return lowered[ext]
    raise UEDatasetsError(f"no image field; looked for {', '.join(IMAGE_EXTENSIONS)} (fields: {_fields(sample)})")


def _fields(sample: dict[str, Any]) -> str:
    return ", ".join(k for k in sample if not k.startswith("__")) or "none"


def label_of(sample: dict[str, Any], label_field: str) -> int:
    """The integer class id in a raw sample's ``label_field`` (ASCII digits, as webdataset's ``cls``)."""
    if label_field not in sample:
        raise UEDatasetsError(f"missing label field {label_field!r} (fields: {_fields(sample)})")
    raw = sample[label_field]
    try:
        return int(raw.decode("ascii").strip() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError, TypeError):
        shown = raw[:40] if isinstance(raw, (bytes, bytearray, str)) else raw
        raise UEDatasetsError(f"label field {label_field!r} is not an integer: {shown!r}") from None


def _prepare(sample: dict[str, Any], options: ShardOptions, labelled: bool, default_source: str) -> tuple[str, Item] | SampleError:
    """The image field and the `Item` of one raw sample, or why it cannot be protected."""
    key, source = sample["__key__"], sample.get("__url__", default_source)
    try:
        ext = image_field_of(sample, options.image_field)
        if ext != OUTPUT_FIELD and OUTPUT_FIELD in sample:
            raise UEDatasetsError(f"image is {ext!r} but the sample already has a {OUTPUT_FIELD!r} field")
        label = label_of(sample, options.label_field) if labelled else None
        return ext, Item(key, sample[ext], label, source)
    except UEDatasetsError as e:
        return SampleError(source, key, str(e))


def protect_samples(
    protection: Protection,
    samples: Iterable[dict[str, Any]],
    options: ShardOptions = ShardOptions(),
    on_skip: Callable[[SampleError], None] | None = None,
    source: str = "<stream>",
) -> Iterator[dict[str, Any]]:
    """Protect a stream of raw webdataset samples, in batches, keeping order and every other field.

    Args:
        protection: a fitted `Protection`.
        samples: dicts ``{"__key__": str, ext: bytes, ...}`` as ``wds.WebDataset`` yields them
            before ``.decode()``.
        options: fields, batch size, device and error policy.
        on_skip: called with each skipped sample's error when ``options.on_error == "skip"``.
        source: name used in errors for samples without ``__url__``.

    Yields:
        The same samples with the image field replaced by ``png`` bytes of the protected image.
    """
    labelled = needs_labels(protection)

    def prepared() -> Iterator[tuple[tuple[list, list], list[Item]]]:
        for group in batched(samples, options.batch_size):
            preps = [_prepare(s, options, labelled, source) for s in group]
            yield (group, preps), [p[1] for p in preps if not isinstance(p, SampleError)]

    stream = protect_encoded_stream(protection, prepared(), source, options.device, options.png_level)
    for (group, preps), pngs in stream:
        done = iter(pngs)
        for sample, prep in zip(group, preps):
            out = prep if isinstance(prep, SampleError) else next(done)
            if isinstance(out, SampleError):
                if options.on_error == "fail":
                    raise out
                if on_skip is not None:
                    on_skip(out)
                continue
            ext = prep[0]
            yield {(OUTPUT_FIELD if k == ext else k): (out if k == ext else v) for k, v in sample.items()}


def protect_stage(protection: Protection, options: ShardOptions = ShardOptions(), **kwargs: Any):
    """A webdataset pipeline stage: ``iterator of raw samples -> iterator of protected samples``.

    Place it before ``.decode()``::

        ds = wds.WebDataset(urls, shardshuffle=False).compose(protect_stage(protection))
        ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(),
                              protect_stage(protection, label_field="cls"), wds.decode("torchrgb8"))

    Keyword arguments override fields of ``options`` (``label_field="label"``, ``device="cuda"``...).
    Skipped samples (``on_error="skip"``) are logged as warnings.
    """
    options = options.replace(**kwargs)

    def stage(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from protect_samples(protection, src, options, on_skip=lambda e: warnings.warn(f"skipped {e}"))

    return stage


# --------------------------------------------------------------------------- shard rewriting


def protect_shard(
    protection: Protection,
    in_url: str,
    out_url: str,
    options: ShardOptions = ShardOptions(),
    progress: Callable[[int], None] | None = None,
) -> ShardStats:
    """Rewrite one shard: protected images, everything else byte-identical, same keys and order.

    Writes ``out_url`` atomically, then its stats file. A bad sample raises `SampleError` (naming the
    shard and key) under ``on_error="fail"``; nothing is left under the output's final name.
    """
    start = time.perf_counter()
    stats = ShardStats(in_url, out_url, protection=protection.public())
    keys: list[str] = []

    def read(src: Any) -> Iterator[dict[str, Any]]:
        try:
            for sample in read_samples(src, in_url):
                stats.samples += 1
                if progress is not None:
                    progress(1)
                yield sample
        except SourceError as e:  # truncated: keep what was read, record where it stopped
            if options.on_error == "fail":
                raise
            stats.skip("", e.reason)

    def track(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for s in samples:
            keys.append(s["__key__"])
            yield s

    def write(f: Any) -> None:
        try:
            src = fsspec.open(in_url, "rb").open()
        except OSError as e:
            raise SourceError(in_url, f"cannot open ({type(e).__name__}: {e})") from None
        with src:
            skip = lambda err: stats.skip(err.key, err.reason)  # noqa: E731
            write_samples(f, track(protect_samples(protection, read(src), options, skip, in_url)))
        check_not_empty(stats, options, "empty shard: no samples")

    atomic_write(out_url, write)
    return finish(stats, protection, keys, start)


def protect_shards(
    protection: Protection,
    inputs: Sequence[str],
    output_dir: str,
    options: ShardOptions = ShardOptions(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rewrite webdataset shards into ``output_dir``, one output per input, resuming finished ones.

    Args:
        protection: a fitted `Protection`.
        inputs: shard URLs (local paths or fsspec URLs such as ``memory://``; ``pipe:`` is not run).
        output_dir: directory URL of the output shards (same names as the inputs).
        options: fields, batch size, device, error policy.
        workers: processes, each rewriting whole shards.
        overwrite: redo shards completed earlier (also those written with another protection).
        progress: show progress bars on stderr.

    Returns:
        The stats of every shard, in input order.
    """
    return run(protect_shard, protection, inputs, output_dir, options, workers, overwrite, progress)
