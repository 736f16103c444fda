"""webdataset adapters: a pipeline stage and resumable shard-to-shard rewriting.

Samples are handled as webdataset's raw samples, ``{"__key__": str, "<ext>": bytes, ...}``, before any
decoding: no field but the images is ever decoded, so nothing from an untrusted shard is unpickled or
executed, and every other field (``__``-prefixed ones included) is passed on byte for byte.

**Every image of a sample is protected**, or the sample fails: an image field is one whose last
extension part is an image format (``jpg``, ``left.png``...), or ``image_field``; each is replaced in
place by its protected image in the output format (``ShardOptions.format``: lossless PNG by default), named
with the format's extension (``png``, ``webp`` or ``jpg``) for that last part (``jpg`` -> ``png``,
``left.jpg`` -> ``left.png``; ``jpg.png`` when that name is taken, as in a sample with both ``png`` and
``jpg``; with ``--format webp``, ``jpg`` -> ``webp``; with ``jpeg:Q``, ``jpg`` stays ``jpg``). An
image format that is not read (``avif``, ``heic``...) and image bytes in a field not named as an image
make the sample fail, and so do compressed images (``seg.png.gz``) and image bytes in ``__``-prefixed
fields, unless the field is listed in ``keep_fields`` (segmentation masks, say), which are passed on
unprotected.

A protection that finds noise by text (T2UE) reads each sample's caption from ``txt`` (webdataset's
convention; ``text_field`` names another), or, given ``class_names``, makes a prompt from its label.

Shard rewriting (`protect_shards`) writes one output shard per input shard under the same name (a
``.tar.gz`` input gives a ``.tar``), in the same sample and key order, through fsspec URLs, under the
commit protocol of `ue_datasets.apply.commit`.
"""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import fsspec

from ..artifact import Protection, as_protection
from ..errors import SampleError, SourceError, UEDatasetsError
from .core import needs_labels, needs_texts
from .encoded import Item, Unprotected, batched, protect_encoded_stream
from .images import IMAGE_EXTENSIONS, UNREAD_IMAGE_EXTENSIONS, looks_like_image, warn_if_lossy
from .shards import ShardOptions, ShardStats, check_not_empty, commit_file, run
from .texts import TextSource

#: The extension of written image fields with the default format (PNG); `OutputFormat.extension` in general.
OUTPUT_FIELD = "png"
#: The caption field of a sample when a text protection is given neither a caption field nor class names.
CAPTION_FIELD = "txt"
#: Entries of a raw sample that are not fields: never written, never taken from a tar member.
META = ("__key__", "__url__", "__local_path__")
#: Extensions of compressed fields (webdataset decompresses ``.gz`` before decoding).
COMPRESSED = ("gz", "bz2", "xz", "zst")


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


def read_samples(fileobj: Any, source: str) -> Iterator[dict[str, Any] | SampleError]:
    """Group a tar stream's regular files into samples ``{"__key__", "__url__", ext: bytes}``.

    Each sample is yielded as soon as the next key's header is read, so a cut never costs a sample
    that was complete before it. A sample that cannot be taken as it is (a duplicate field, a field
    named like a metadata entry, a key whose members are not contiguous) is yielded as a
    `SampleError` in its place, and reading goes on.

    Raises:
        SourceError: the tar is unreadable, cut or corrupt (the message names the last complete
            sample).
    """
    current: dict[str, Any] | None = None
    problem = ""
    seen: set[str] = set()
    last_key = None
    tarinfo, state = _end_tracking_tarinfo()

    def close() -> dict[str, Any] | SampleError:
        key = current["__key__"]  # type: ignore[index]
        if key in seen:
            return SampleError(source, key, "key repeats: its members are not contiguous in the tar")
        seen.add(key)
        return SampleError(source, key, problem) if problem else current  # type: ignore[return-value]

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
                    yield close()
                    last_key, current, problem = current["__key__"], None, ""
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is None:
                    current = {"__key__": key, "__url__": source}
                if ext in META:
                    problem = problem or f"field {ext!r} has the name of a metadata entry"
                elif ext in current:
                    problem = problem or f"duplicate field {ext!r}"
                else:
                    current[ext] = data
        if state["end"] != "EOFHeaderError":
            raise tarfile.ReadError(f"no end-of-archive marker ({state['end'] or 'stream ended'})")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        where = f"after sample {last_key!r}" if last_key is not None else "before the first complete sample"
        raise SourceError(source, f"truncated or corrupt tar {where} ({type(e).__name__}: {e})") from None
    if current is not None:
        yield close()


def write_samples(fileobj: Any, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples as a reproducible tar (mtime 0, mode 0444, no owner); returns the count."""
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext in META:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


# --------------------------------------------------------------------------- protecting samples


def _fields(sample: dict[str, Any]) -> str:
    return ", ".join(k for k in sample if k not in META) or "none"


def _is_image_name(field: str) -> bool:
    """Whether a field's last extension part is a format that is read as an image."""
    return field not in META and field.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _named_field(sample: dict[str, Any], image_field: str | None) -> None:
    if image_field is not None and image_field not in sample:
        raise UEDatasetsError(f"no image field {image_field!r} (fields: {_fields(sample)})")


def image_fields(sample: dict[str, Any], image_field: str | None = None, keep_fields: Sequence[str] = ()) -> list[str]:
    """Every field of a raw sample that holds an image (see the module docstring), in sample order.

    Raises:
        UEDatasetsError: no image field (or ``image_field`` is missing), an image format that is not
            read, or image bytes in a field not named as an image.
    """
    _named_field(sample, image_field)
    found = []
    for k, v in sample.items():
        if k in META or k in keep_fields:
            continue
        parts = k.lower().split(".")
        last = parts[-1]
        if last in COMPRESSED and len(parts) > 1 and parts[-2] in IMAGE_EXTENSIONS + UNREAD_IMAGE_EXTENSIONS:
            raise UEDatasetsError(f"field {k!r}: compressed images are not read (webdataset decompresses and "
                                  "decodes them); store them uncompressed, or list the field in keep_fields "
                                  "(--keep-field) to publish it unprotected")
        if last in UNREAD_IMAGE_EXTENSIONS:
            raise UEDatasetsError(f"field {k!r}: {last} images are not read; convert them (png, jpg, webp...) "
                                  "or list the field in keep_fields (--keep-field) to publish it unprotected")
        if k == image_field or _is_image_name(k):
            found.append(k)
        elif isinstance(v, (bytes, bytearray, memoryview)) and looks_like_image(v):
            raise UEDatasetsError(f"field {k!r} holds image data but is not named as an image; name it with an "
                                  "image extension, or list it in keep_fields (--keep-field) to publish it unprotected")
    if not found:
        raise UEDatasetsError(f"no image field; looked for {', '.join(IMAGE_EXTENSIONS)} (fields: {_fields(sample)})")
    return found


def image_field_of(sample: dict[str, Any], image_field: str | None) -> str:
    """The field of a raw sample's first image (as fit and the audit read it): ``image_field``, or the
    first field whose last extension part is an image format."""
    _named_field(sample, image_field)
    if image_field is not None:
        return image_field
    for k in sample:
        if _is_image_name(k):
            return k
    raise UEDatasetsError(f"no image field; looked for {', '.join(IMAGE_EXTENSIONS)} (fields: {_fields(sample)})")


def output_names(sample: dict[str, Any], fields: Sequence[str], extension: str = OUTPUT_FIELD) -> dict[str, str]:
    """The name each image field is written under, its last part replaced by ``extension`` (the output
    format's: ``png``, ``webp``, ``jpg``; see the module docstring)."""
    taken = {k for k in sample if k not in META and k not in fields}
    names: dict[str, str] = {}
    for k in sorted(fields, key=lambda f: f.rsplit(".", 1)[-1].lower() != extension):  # fields of that name first
        stem = k.rsplit(".", 1)[0] + "." + extension if "." in k else extension
        name = stem if stem not in taken else k + "." + extension
        if name in taken:
            raise UEDatasetsError(f"image field {k!r} cannot be written: {stem!r} and {name!r} are taken")
        taken.add(name)
        names[k] = name
    return names


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


def shard_texts(texts: TextSource) -> TextSource:
    """``texts`` as shards read them: a caption field `CAPTION_FIELD` when it names neither a caption field
    nor class names."""
    return texts if texts.field is not None or texts.class_names else replace(texts, field=CAPTION_FIELD)


def text_of(protection: Protection, sample: dict[str, Any], texts: TextSource, label_field: str) -> str:
    """The text a raw sample is protected by: its caption field (UTF-8), or the prompt of its label's class.

    Raises:
        UEDatasetsError: a missing or non-text caption field, a label with no class name.
    """
    if texts.field is not None and texts.field not in sample:
        raise UEDatasetsError(f"missing caption field {texts.field!r} (fields: {_fields(sample)}); name the caption "
                              "field (text_field, --caption-field) or give class names (class_names, --class-names)")
    label = label_of(sample, label_field) if texts.from_labels else None
    return texts.text(protection, caption=None if texts.field is None else sample[texts.field], label=label,
                      key=sample["__key__"])


def _prepare(protection: Protection, sample: dict[str, Any] | SampleError, options: ShardOptions, labelled: bool,
             texts: TextSource | None, default_source: str) -> tuple[dict[str, str], list[Item]] | SampleError:
    """The output name of each image field and their `Item`s (with the sample's text when ``texts`` is
    given), or why the sample cannot be protected."""
    if isinstance(sample, SampleError):
        return sample
    key, source = sample["__key__"], sample.get("__url__", default_source)
    try:
        fields = image_fields(sample, options.image_field, options.keep_fields)
        names = output_names(sample, fields, options.output_format.extension)
        label = label_of(sample, options.label_field) if labelled else None
        text = text_of(protection, sample, texts, options.label_field) if texts is not None else None
        return names, [Item(key, sample[f], label, source, f, text) for f in fields]
    except UEDatasetsError as e:
        return SampleError(source, key, str(e))


def protect_samples(
    protection: Protection,
    samples: Iterable[dict[str, Any] | SampleError],
    options: ShardOptions = ShardOptions(),
    on_skip: Callable[[SampleError], None] | None = None,
    source: str = "<stream>",
) -> Iterator[dict[str, Any]]:
    """Protect a stream of raw webdataset samples, in batches, keeping order and every other field.

    Args:
        protection: a fitted `Protection`.
        samples: dicts ``{"__key__": str, ext: bytes, ...}`` as ``wds.WebDataset`` yields them
            before ``.decode()`` (or `SampleError`s in place of samples that could not be read).
        options: fields (the caption field ``txt`` by default, for text protections), batch size,
            device and error policy.
        on_skip: called with each skipped sample's error when ``options.on_error == "skip"``.
        source: name used in errors for samples without ``__url__``.

    Yields:
        The same samples with each image field replaced, in place, by the bytes of its protected image
        in ``options.format`` (under the name `output_names` gives).
    """
    labelled = needs_labels(protection)
    texts = shard_texts(options.text_source) if needs_texts(protection) else None

    def prepared() -> Iterator[tuple[tuple[list, list], list[Item]]]:
        for group in batched(samples, options.batch_size):
            preps = [_prepare(protection, s, options, labelled, texts, source) for s in group]
            yield (group, preps), [it for p in preps if not isinstance(p, SampleError) for it in p[1]]

    stream = protect_encoded_stream(protection, prepared(), source, options.device, options.png_level,
                                    max_pixels=options.max_pixels, unfitted=options.unfitted,
                                    output_format=options.output_format)
    for (group, preps), pngs in stream:
        done = iter(pngs)
        for sample, prep in zip(group, preps):
            if isinstance(prep, SampleError):
                out: dict[str, bytes] | SampleError = prep
            else:
                results = [next(done) for _ in prep[1]]
                failed = next((r for r in results if isinstance(r, SampleError)), None)
                out = failed if failed is not None else {it.field: r for it, r in zip(prep[1], results)}  # type: ignore[misc]
            if isinstance(out, SampleError):
                if options.on_error == "fail":
                    raise out
                if on_skip is not None:
                    on_skip(out)
                continue
            names = prep[0]  # type: ignore[index]
            yield {names.get(k, k): out.get(k, v) for k, v in sample.items()}  # type: ignore[union-attr]


def protect_stage(protection: Protection | str | os.PathLike, options: ShardOptions = ShardOptions(), **kwargs: Any):
    """A webdataset pipeline stage: ``iterator of raw samples -> iterator of protected samples``.

    Place it before ``.decode()``:

    >>> import webdataset as wds
    >>> from ue_datasets import fit
    >>> protection = fit("cuda", num_classes=10, key=123456789)
    >>> urls = "shards/train-{000000..000003}.tar"
    >>> ds = wds.WebDataset(urls, shardshuffle=False).compose(protect_stage(protection)).decode("torchrgb8")
    >>> image, label = next(iter(ds.to_tuple("png", "cls")))
    >>> image.dtype, image.shape, label
    (torch.uint8, torch.Size([3, 28, 28]), 0)
    >>> ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(),
    ...                       protect_stage(protection, label_field="cls"), wds.decode("torchrgb8"))
    >>> sum(1 for _ in ds)
    20

    ``protection`` is a `Protection` or its artifact directory. Keyword arguments override fields of
    ``options`` (``label_field="label"``, ``device="cuda"``, ``text_field="caption"``,
    ``class_names=names``, ``format="webp"``...). Skipped samples (``on_error="skip"``) are logged as
    warnings; a lossy ``format`` warns once, here (`ue_datasets.apply.images.LossyOutputWarning`).
    """
    protection, options = as_protection(protection), options.replace(**kwargs)
    warn_if_lossy(options.output_format)

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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Rewrite one shard: protected images, everything else byte-identical, same keys and order.

    Writes ``out_url`` under the commit protocol (`ue_datasets.apply.shards.commit_file`) and returns
    its stats; an output that already checks out is kept (``resumed``). A bad sample raises
    `SampleError` (naming the shard and key) under ``on_error="fail"``; nothing is left under the
    output's final name.
    """

    def body(f: Any, stats: ShardStats) -> list[str]:
        keys: list[str] = []

        def read(src: Any) -> Iterator[dict[str, Any] | SampleError]:
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
                stats.unprotected += any(isinstance(v, Unprotected) for v in s.values())
                yield s

        try:
            src = fsspec.open(in_url, "rb").open()
        except OSError as e:
            raise SourceError(in_url, f"cannot open ({type(e).__name__}: {e})") from None
        with src:
            skip = lambda err: stats.skip(err.key, err.reason)  # noqa: E731
            write_samples(f, track(protect_samples(protection, read(src), options, skip, in_url)))
        check_not_empty(stats, in_url, options, "empty shard: no samples")
        return keys

    return commit_file(protection, in_url, out_url, options, overwrite, body)


def protect_shards(
    protection: Protection | str | os.PathLike,
    inputs: str | Sequence[str],
    output_dir: str,
    options: ShardOptions = ShardOptions(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    engine: str | Any = "local",
) -> list[dict[str, Any]]:
    """Rewrite webdataset shards into ``output_dir``, one output per input, resuming finished ones.

    Args:
        protection: a fitted `Protection` or its artifact directory.
        inputs: shard URLs (local paths or fsspec URLs such as ``memory://``; ``pipe:`` is not run),
            or one string as ``ue-datasets protect --input`` takes it (a brace pattern, glob or folder).
        output_dir: directory URL of the output shards (same names as the inputs).
        options: fields, batch size, device, error policy.
        workers: processes, each rewriting whole shards.
        overwrite: redo shards completed earlier (also those written with another protection).
        progress: show progress bars on stderr.
        engine: ``"local"``, ``"ray"`` or a `ue_datasets.apply.ray.RayEngine`: one Ray task per shard.

    Returns:
        The stats of every shard, in input order.
    """
    from .sources import input_files

    urls, patterns = input_files(inputs, "wds")
    warn_if_lossy(options.output_format)
    return run(protect_shard, as_protection(protection), urls, output_dir, options, workers, overwrite, progress,
               patterns, engine)
