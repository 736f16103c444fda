"""Stream a source through a surrogate encoder, caching features on disk in resumable parts.

One pass over the samples (any source `protect` accepts, in source order) decodes each image as the
adapters do, embeds it with the encoder's own preprocessing in batches, and keeps per sample: its
key, a checksum of its pixels (to recognise it at apply time), its features and a copy resized to the
fit resolution (what the perturbation is optimised on). Every ``part_size`` samples a part file is
written atomically (``part-00000.safetensors``); a restarted fit skips the samples of complete parts
without decoding them and goes on from there.

With a Ray engine (`ue_datasets.apply.ray.RayEngine`) each input file (shard or parquet file) is
embedded by a Ray task holding the encoder, and becomes one part, written here as its task finishes; a
restarted fit skips the files whose parts are complete and from the same file. The rest of the fit
(k-means, the perturbations) stays in this process. Features may differ from the local pass in the last
float bits, because the encoder sees other batches (a batch never spans two files on Ray).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..apply.encoded import batched, shared_pool
from ..apply.images import resize_square
from ..apply.records import colour_image, iter_records
from ..errors import UEDatasetsError
from ..kernels.samples import pixel_checksum
from ..progress import progress_bar
from ..version import __version__

CACHE_FORMAT = 1
MANIFEST = "cache.json"


@dataclass
class FeatureSet:
    """Everything the later fit stages need, concatenated over the parts.

    Attributes:
        keys: N sample keys, in source order.
        features: float32 ``(N, D)`` encoder features (not normalised).
        images: uint8 ``(N, C, R, R)`` images resized to the fit resolution; C = 1 when every image
            is grayscale, else 3.
        checksums: int64 ``(N, 2)`` `pixel_checksum` of each image at its own size.
    """

    keys: list[str]
    features: torch.Tensor
    images: torch.Tensor
    checksums: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)


def _write_part(path: Path, keys: list[str], features: list[torch.Tensor], images: list[torch.Tensor],
                sums: list[torch.Tensor], source: dict | None = None) -> None:
    from safetensors.torch import save_file

    channels = 3 if any(t.shape[0] == 3 for t in images) else 1
    tensors = {
        "features": torch.cat(features),
        "images": torch.stack([t.expand(channels, -1, -1) for t in images]).contiguous(),
        "checksums": torch.cat(sums),
    }
    tmp = path.with_suffix(".partial")
    metadata = {"keys": json.dumps(keys), **({"source": json.dumps(source, sort_keys=True)} if source else {})}
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _check_manifest(directory: Path, expected: dict) -> int:
    """Complete parts already in ``directory`` (0 for a new cache); refuses a cache of another fit."""
    path = directory / MANIFEST
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("part-*"):
            stale.unlink()
        path.write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
        return 0
    found = json.loads(path.read_text())
    different = sorted(k for k in {*expected, "layout"} if k != "ue_datasets_version"
                       and found.get(k) != expected.get(k))
    if different:
        raise UEDatasetsError(
            f"{directory}: a feature cache of another fit (differs in {', '.join(different)}); "
            "give another cache directory or delete this one"
        )
    return len(sorted(directory.glob("part-*.safetensors")))


def extract_features(
    src: str,
    encoder,
    cache_dir: str | os.PathLike,
    *,
    resolution: int,
    image_field: str | None = None,
    key_field: str | None = None,
    batch_size: int = 256,
    part_size: int = 8192,
    limit: int | None = None,
    progress: bool = True,
    engine: Any = "local",
) -> FeatureSet:
    """Embed every sample of ``src`` with ``encoder`` (an `ue_datasets.encoders.Encoder`), resumably.

    Args:
        src: shards, a ``save_to_disk`` directory (every split) or parquet files.
        cache_dir: where the parts go; reused by a rerun with the same source, encoder and settings.
        resolution: side of the stored copies of the images (the perturbation's resolution).
        batch_size: images per encoder batch.
        part_size: samples per part file (a multiple of ``batch_size`` is best).
        limit: use only the first ``limit`` samples (local engine only).
        engine: ``"local"``, or ``"ray"`` or a `ue_datasets.apply.ray.RayEngine`: one Ray task per input file.

    Raises:
        SampleError: an image cannot be decoded (names the file and the key).
        UEDatasetsError: an empty source; a cache directory of another fit.
    """
    directory = Path(cache_dir)
    expected = {
        "format": CACHE_FORMAT, "source": src, "encoder": encoder.spec.to_json(),
        "resolution": resolution, "part_size": part_size, "image_field": image_field, "key_field": key_field,
        "limit": limit, "ue_datasets_version": __version__,
    }
    if engine != "local":
        if limit is not None:
            raise UEDatasetsError("limit takes the first samples of the source; on Ray files are embedded apart: "
                                  "give fewer input files instead")
        _extract_on_ray(src, encoder, directory, {**expected, "layout": "file"}, resolution, image_field, key_field,
                        batch_size, engine, progress)
        return load_features(directory)
    done = _check_manifest(directory, expected)
    records = iter_records(src, image_field=image_field, key_field=key_field)
    for index in range(done):  # complete parts: check their keys against the source, decode nothing
        stored = _part_keys(directory / f"part-{index:05d}.safetensors")
        seen = [r.key for _, r in zip(stored, records)]  # stored first: zip then takes no extra record
        if seen != stored:
            raise UEDatasetsError(f"{directory}: part {index} does not match {src} (the source changed?); "
                                  "delete the cache to start over")
    n = done * part_size
    bar = progress_bar(total=limit, initial=n, desc="features", unit="img", disable=not progress)
    keys: list[str] = []
    feats: list[torch.Tensor] = []
    small: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    if limit is not None:
        records = itertools.islice(records, max(0, limit - n))
    try:
        for batch_keys, batch_feats, batch_small, batch_sums in _embed(records, encoder, resolution, batch_size):
            feats.append(batch_feats)
            sums.append(batch_sums)
            small.extend(batch_small)
            keys.extend(batch_keys)
            n += len(batch_keys)
            bar.update(len(batch_keys))
            while len(keys) >= part_size:
                _flush(directory, done, keys, feats, small, sums, part_size)
                done += 1
        if keys:
            _flush(directory, done, keys, feats, small, sums, len(keys))
    finally:
        bar.close()
    return load_features(directory)


def _embed(records: Iterable[Any], encoder, resolution: int, batch_size: int
           ) -> Iterator[tuple[list[str], torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    """Per batch of records: keys, float32 features ``(b, D)`` on CPU, uint8 copies ``(C, R, R)`` and
    int64 checksums ``(b, 2)``; images are decoded in the shared codec pool."""
    pool = shared_pool()
    for batch in batched(records, batch_size):
        images = list(pool.map(colour_image, batch))
        yield ([r.key for r in batch], encoder.encode(images, batch_size=batch_size).float().cpu(),
               [resize_square(t, resolution) for t in images], torch.cat([pixel_checksum(t[None]) for t in images]))


def _embed_file(url: str, encoder, device: str, resolution: int, image_field: str | None, key_field: str | None,
                batch_size: int, threads: int) -> tuple[list[str], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """One input file's part, in a Ray worker: keys, features, small copies, checksums."""
    torch.set_num_threads(threads)
    encoder = encoder.to(device).eval()
    keys, feats, small, sums = [], [], [], []
    for batch_keys, batch_feats, batch_small, batch_sums in _embed(
            iter_records(url, image_field=image_field, key_field=key_field), encoder, resolution, batch_size):
        keys.extend(batch_keys)
        feats.append(batch_feats)
        small.extend(batch_small)
        sums.append(batch_sums)
    if not keys:
        return [], torch.empty(0), [], torch.empty(0, 2, dtype=torch.int64)
    return keys, torch.cat(feats), small, torch.cat(sums)


def _extract_on_ray(src: str, encoder, directory: Path, expected: dict, resolution: int, image_field: str | None,
                    key_field: str | None, batch_size: int, engine: Any, progress: bool) -> None:
    """Embed each input file of ``src`` in a Ray task; write each as part ``part-{file:05d}`` here."""
    from ..apply.commit import source_identity
    from ..apply.ray import RayEngine, each_task, ray_session, remote_function
    from ..apply.sources import resolve

    engine = RayEngine() if engine == "ray" else engine
    source = resolve(src)
    if source.kind == "hf":
        raise UEDatasetsError(f"{src}: on Ray, features are computed file by file (shards or parquet files); "
                              "embed a dataset directory locally")
    _check_manifest(directory, expected)
    for part in directory.glob("part-[0-9][0-9][0-9][0-9][0-9].safetensors"):  # of input files since removed
        if int(part.stem.removeprefix("part-")) >= len(source.urls):
            part.unlink()
    todo: dict[int, str] = {}
    identities = {}
    for i, url in enumerate(source.urls):
        identities[i] = source_identity(url)
        part = directory / f"part-{i:05d}.safetensors"
        if not (part.exists() and _part_source(part) == identities[i]):
            todo[i] = url
    device = "cuda" if engine.gpus_per_task > 0 else "cpu"
    home = next(encoder.parameters(), torch.empty(0)).device
    bar = progress_bar(total=len(source.urls), initial=len(source.urls) - len(todo), desc="features", unit="file",
                       disable=not progress)
    try:
        with ray_session(engine.address) as ray:
            shared = ray.put(encoder.to("cpu"))
            encoder.to(home)
            threads = max(1, int(engine.cpus_per_task))
            calls = {i: (url, shared, device, resolution, image_field, key_field, batch_size, threads)
                     for i, url in todo.items()}
            names = {i: os.path.basename(url.rstrip("/")) for i, url in todo.items()}
            for i, (keys, feats, small, sums) in each_task(ray, remote_function(ray, _embed_file, engine), calls,
                                                          names, engine):
                part = directory / f"part-{i:05d}.safetensors"
                if keys:
                    _write_part(part, keys, [feats], small, [sums], source=identities[i])
                else:  # an empty file (now) has no part
                    part.unlink(missing_ok=True)
                bar.update(1)
    finally:
        encoder.to(home)
        bar.close()


def _part_source(path: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        source = f.metadata().get("source")
    return json.loads(source) if source else None


def _flush(directory: Path, index: int, keys: list[str], feats: list[torch.Tensor], small: list[torch.Tensor],
           sums: list[torch.Tensor], count: int) -> None:
    """Write the first ``count`` buffered samples as part ``index`` and drop them from the buffers."""
    f, s = torch.cat(feats), torch.cat(sums)
    _write_part(directory / f"part-{index:05d}.safetensors", keys[:count], [f[:count]], small[:count], [s[:count]])
    rest_f, rest_s = f[count:], s[count:]
    del keys[:count], small[:count]
    feats[:] = [rest_f] if len(rest_f) else []
    sums[:] = [rest_s] if len(rest_s) else []


def _part_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["keys"])


def iter_features(cache_dir: str | os.PathLike, chunk: int = 4096) -> Iterator[torch.Tensor]:
    """The cached features part by part, in chunks of at most ``chunk`` rows (float32 ``(b, D)``),
    reading one part at a time: the stream `minibatch_kmeans` clusters without holding every feature."""
    from safetensors import safe_open

    for part in sorted(Path(cache_dir).glob("part-*.safetensors")):
        with safe_open(part, framework="pt") as f:
            yield from f.get_tensor("features").split(chunk)


def load_features(cache_dir: str | os.PathLike) -> FeatureSet:
    """Read every part of a feature cache into one `FeatureSet`."""
    from safetensors import safe_open

    parts = sorted(Path(cache_dir).glob("part-*.safetensors"))
    if not parts:
        raise UEDatasetsError(f"{cache_dir}: no samples were embedded (is the source empty?)")
    keys: list[str] = []
    feats, images, sums = [], [], []
    for part in parts:
        with safe_open(part, framework="pt") as f:
            keys.extend(json.loads(f.metadata()["keys"]))
            feats.append(f.get_tensor("features"))
            images.append(f.get_tensor("images"))
            sums.append(f.get_tensor("checksums"))
    channels = max(t.shape[1] for t in images)
    images = [t.expand(-1, channels, -1, -1) for t in images]
    return FeatureSet(keys, torch.cat(feats), torch.cat(images).contiguous(), torch.cat(sums))
