"""Measurements 3 to 5 of ``recipes/bench_apply.py``: what a publisher protecting a large dataset sees.

3. The CUDA filter in memory: ``protect_batch`` on B = 256 images of 224x224x3, on CPU, through the
   fused kernel (`ue_datasets.kernels.fused_filter`) against the same call with
   ``UE_DATASETS_FUSED=0`` (the torch passes, the reference), after checking they give the same bytes.
   Target: >= 5,000 images/s fused.
4. Output formats on JPEG input: webdataset shards of ``KEY.jpg`` (quality 90, PIL's 4:2:0) +
   ``KEY.cls``, at 224x224 and 512x512, from two sources: crops of a real photograph (matplotlib's
   ``grace_hopper.jpg``, 512x600, random offsets, every other one mirrored) and Fashion-MNIST upsampled
   (bilinear) to RGB. ``protect_shards`` writes them as ``png``, ``webp``, ``jpeg:95`` and ``jpeg:90``
   (``ShardOptions(format=...)``); reported: output bytes / input bytes (whole shards, as published),
   images/s, and each format's speed against PNG's. The lossless outputs are checked first to hold
   ``protect_batch``'s pixels of the decoded input, byte for byte.
5. The Ray engine against the local one on the same PNG shards: ``protect_shards(engine=RayEngine())``
   on a local Ray cluster started once (``ray.init(num_cpus=cpu_count)``, its start not timed), against
   the local engine with ``workers=1`` and with ``workers=cpu_count`` (spawned processes). The outputs
   are checked to be byte-identical first. Skipped, saying so, when ray is not installed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image

from bench_timing import interleaved, print_ratio, print_times, ratio, summary  # recipes/, beside this script
from fashion_mnist import write_image_shards
from ue_datasets import protect_batch
from ue_datasets.apply.commit import stats_url
from ue_datasets.apply.images import LossyOutputWarning, decode, pil_to_tensor
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards, read_samples
from ue_datasets.kernels.convolution import FUSED_ENV

KERNEL_TARGET = 5000.0  # images/s of the fused kernel at 224x224x3, at least
FORMATS = ("png", "webp", "jpeg:95", "jpeg:90")
INPUT_JPEG_QUALITY = 90


def fields(urls: list[str]) -> list[dict]:
    """Every sample of ``urls``, in order, as read by the library."""
    samples = []
    for url in urls:
        with open(url, "rb") as f:
            samples.extend(read_samples(f, url))
    return samples


def image_of(sample: dict) -> torch.Tensor:
    """The decoded uint8 ``(C, H, W)`` image of a sample's one image field."""
    (field,) = [k for k in sample if k in ("png", "jpg", "webp")]
    return pil_to_tensor(decode(sample[field]))


# --------------------------------------------------------------------------- 3: the kernel


def bench_kernel(protection, images: list[Image.Image], labels: np.ndarray, repeats: int) -> dict:
    x = torch.stack([pil_to_tensor(im) for im in images]).contiguous()
    y = torch.as_tensor(labels[: len(images)], dtype=torch.int64)
    before = os.environ.get(FUSED_ENV)

    def call(fused: bool):
        def run():
            os.environ[FUSED_ENV] = "1" if fused else "0"
            return protect_batch(protection, x, y)
        return run

    try:
        contenders = {"fused": call(True), "torch_passes": call(False)}
        assert torch.equal(contenders["fused"](), contenders["torch_passes"]()), "fused kernel != torch passes"
        times = interleaved(contenders, repeats)
    finally:
        if before is None:
            os.environ.pop(FUSED_ENV, None)
        else:
            os.environ[FUSED_ENV] = before
    n = len(images)
    result = {"shape": list(x.shape), "fused": summary(times["fused"], n),
              "torch_passes": summary(times["torch_passes"], n),
              "speedup": ratio(times["torch_passes"], times["fused"]), "target_min_images_per_s": KERNEL_TARGET}
    result["meets_target"] = result["fused"]["images_per_s"] >= KERNEL_TARGET
    return result


def print_kernel(r: dict) -> None:
    b, c, h, w = r["shape"]
    print(f"\n[3] CUDA filter in memory, {h}x{w}x{c}: protect_batch on {b} images, fused kernel vs torch passes "
          "(same bytes)")
    print_times("fused (numba)", r["fused"])
    print_times("torch passes", r["torch_passes"])
    ok = "ok" if r["meets_target"] else "MISSED"
    print(f"    fused images/s       target >= {r['target_min_images_per_s']:,.0f}: {ok}")
    print_ratio("fused speed-up", r["speedup"])


# --------------------------------------------------------------------------- 4: output formats


def photo_crops(size: int, n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` crops of ``size`` x ``size`` of a real photograph (matplotlib's grace_hopper.jpg, 512x600 RGB)
    at random offsets, every other one mirrored."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        photo = im.convert("RGB")
    w, h = photo.size
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        crop = photo.crop((x0, y0, x0 + size, y0 + size))
        crops.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else crop)
    return crops


def bench_formats(protection, source: str, images: list[Image.Image], labels: np.ndarray, batch: int,
                  repeats: int, tmp: Path) -> dict:
    size, n = images[0].size[0], len(images)
    folder = tmp / f"jpeg-{source}-{size}"
    keys = [f"{source}-{i:06d}" for i in range(n)]
    urls = write_image_shards(images, labels[:n], keys, folder / "in", "shard-{:05d}.tar", n,
                            jpeg_quality=INPUT_JPEG_QUALITY)
    in_bytes = sum(os.path.getsize(u) for u in urls)

    def run(fmt: str):
        out = folder / f"out-{fmt.replace(':', '')}"

        def go():
            options = ShardOptions(device="cpu", batch_size=batch, format=fmt)
            stats = protect_shards(protection, urls, str(out), options, overwrite=True, progress=False)
            assert sum(s["written"] for s in stats) == n, stats
        return go, out

    runs = {fmt: run(fmt) for fmt in FORMATS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        for go, _ in runs.values():
            go()
        # Lossless outputs hold protect_batch's pixels of the decoded input, byte for byte.
        inputs = fields(urls)
        expected = protect_batch(protection, torch.stack([image_of(s) for s in inputs]),
                                 torch.as_tensor(labels[:n], dtype=torch.int64))
        for fmt in ("png", "webp"):
            written = fields([str(runs[fmt][1] / Path(u).name) for u in urls])
            assert [s["__key__"] for s in written] == keys
            assert all(torch.equal(image_of(s), e) for s, e in zip(written, expected)), f"{fmt} != protect_batch"
        times = interleaved({fmt: go for fmt, (go, _) in runs.items()}, repeats)
    result = {"source": source, "size": size, "images": n, "input_bytes": in_bytes,
              "input_jpeg_quality": INPUT_JPEG_QUALITY, "formats": {}}
    for fmt, (_, out) in runs.items():
        out_bytes = sum(os.path.getsize(out / Path(u).name) for u in urls)
        result["formats"][fmt] = {**summary(times[fmt], n), "output_bytes": out_bytes,
                                  "bytes_ratio": out_bytes / in_bytes,
                                  "speed_vs_png": ratio(times["png"], times[fmt])}
    return result


def print_formats(results: list[dict]) -> None:
    first = results[0]
    print(f"\n[4] output formats on JPEG-q{first['input_jpeg_quality']} input shards: protect_shards, CUDA, device cpu "
          "(lossless outputs equal protect_batch byte for byte)")
    print(f"    {'source':18s} {'size':>7s} {'images':>6s} " + "".join(f"{f:>22s}" for f in FORMATS))
    print(f"    {'':18s} {'':>7s} {'':>6s} " + "".join(f"{'out/in, img/s, vs png':>22s}" for _ in FORMATS))
    for r in results:
        cells = "".join(
            f"{v['bytes_ratio']:>7.2f}x {v['images_per_s']:6.0f} {v['speed_vs_png']['median']:5.2f}x "
            for v in r["formats"].values())
        print(f"    {r['source']:18s} {r['size']:>4d}^2 {r['images']:>6d}  {cells}")


# --------------------------------------------------------------------------- 5: Ray against local


def untimed(stats_path: str) -> dict:
    """A stats file without what differs from run to run (its ``seconds``)."""
    return {k: v for k, v in json.loads(Path(stats_path).read_text()).items() if k not in ("seconds", "resumed")}


def bench_ray(protection, urls: list[str], n: int, batch: int, repeats: int, tmp: Path) -> dict | None:
    try:
        import ray
    except ImportError:
        return None
    from ue_datasets.apply.ray import RayEngine

    cores = os.cpu_count() or 1
    options = ShardOptions(device="cpu", batch_size=batch)

    def run(name: str, **kwargs):
        out = tmp / f"engine-{name}"

        def go():
            stats = protect_shards(protection, urls, str(out), options, overwrite=True, progress=False, **kwargs)
            assert sum(s["written"] for s in stats) == n, stats
        return go, out

    runs = {"local_1": run("local_1"), f"local_{cores}": run(f"local_{cores}", workers=cores),
            "ray": run("ray", engine=RayEngine())}
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    try:
        for go, _ in runs.values():
            go()
        for name, (_, out) in runs.items():  # the same bytes, names and stats whichever engine
            for u in urls:
                ours, ref = out / Path(u).name, runs["local_1"][1] / Path(u).name
                assert ours.read_bytes() == ref.read_bytes(), f"{name}: {ours.name} differs from local_1's"
                assert untimed(stats_url(str(ours))) == untimed(stats_url(str(ref))), f"{name}: {ours.name} stats"
        times = interleaved({name: go for name, (go, _) in runs.items()}, repeats)
    finally:
        ray.shutdown()
    result = {"images": n, "files": len(urls), "cores": cores, "ray_version": ray.__version__}
    for name in runs:
        result[name] = summary(times[name], n)
    result["ray_over_local_1"] = ratio(times["ray"], times["local_1"])
    result[f"ray_over_local_{cores}"] = ratio(times["ray"], times[f"local_{cores}"])
    return result


def print_ray(r: dict | None) -> None:
    if r is None:
        print('\n[5] Ray engine: skipped, ray is not installed (pip install "ue-datasets[ray]")')
        return
    c = r["cores"]
    print(f"\n[5] Ray engine vs local on one machine: {r['images']} images in {r['files']} PNG shards, "
          f"ray {r['ray_version']} local cluster of {c} CPUs (started once, not timed); outputs byte-identical")
    print_times("local, workers 1", r["local_1"])
    print_times(f"local, workers {c}", r[f"local_{c}"])
    print_times("ray, 1 task per file", r["ray"])
    print_ratio("ray / local 1", r["ray_over_local_1"])
    print_ratio(f"ray / local {c}", r[f"ray_over_local_{c}"])
