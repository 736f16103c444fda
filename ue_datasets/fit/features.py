"""Stream a source through a surrogate encoder, caching features on disk in resumable parts.

One pass over the samples (any source `protect` accepts, in source order) decodes each image as the
adapters do, embeds it with the encoder's own preprocessing in batches, and keeps per sample: its
key, a checksum of its pixels (to recognise it at apply time), its features and a copy resized to the
fit resolution (what the perturbation is optimised on). Every ``part_size`` samples a part file is
written atomically (``part-00000.safetensors``); a restarted fit skips the samples of complete parts
without decoding them and goes on from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
                sums: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    channels = 3 if any(t.shape[0] == 3 for t in images) else 1
    tensors = {
        "features": torch.cat(features),
        "images": torch.stack([t.expand(channels, -1, -1) for t in images]).contiguous(),
        "checksums": torch.cat(sums),
    }
    tmp = path.with_suffix(".partial")
    save_file(tensors, tmp, metadata={"keys": json.dumps(keys)})
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
    different = sorted(k for k in expected if k not in ("ue_datasets_version",) and found.get(k) != expected[k])
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
) -> FeatureSet:
    """Embed every sample of ``src`` with ``encoder`` (an `ue_datasets.encoders.Encoder`), resumably.

    Args:
        src: shards, a ``save_to_disk`` directory (every split) or parquet files.
        cache_dir: where the parts go; reused by a rerun with the same source, encoder and settings.
        resolution: side of the stored copies of the images (the perturbation's resolution).
        batch_size: images per encoder batch.
        part_size: samples per part file (a multiple of ``batch_size`` is best).
        limit: use only the first ``limit`` samples.

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
    pool = shared_pool()
    try:
        for batch in batched(records, batch_size):
            if limit is not None:
                batch = batch[: max(0, limit - n)]
                if not batch:
                    break
            images = list(pool.map(colour_image, batch))
            feats.append(encoder.encode(images, batch_size=batch_size).float().cpu())
            sums.append(torch.cat([pixel_checksum(t[None]) for t in images]))
            small.extend(resize_square(t, resolution) for t in images)
            keys.extend(r.key for r in batch)
            n += len(batch)
            bar.update(len(batch))
            while len(keys) >= part_size:
                _flush(directory, done, keys, feats, small, sums, part_size)
                done += 1
        if keys:
            _flush(directory, done, keys, feats, small, sums, len(keys))
    finally:
        bar.close()
    return load_features(directory)


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
