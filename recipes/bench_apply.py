"""Benchmark of stage 3 (apply) on real Fashion-MNIST images, on CPU, contenders measured side by side.

    python recipes/bench_apply.py [--root /usr/share/datasets/fashion-mnist] [--repeats 5]
                                  [--quick] [--threads N] [--shard-batch 256] [--only 1,2,3,4,5] [--json PATH]

Two image sizes, both from the real Fashion-MNIST test split:

* ``224``: 28x28 images upsampled to 224x224 with PIL bilinear resampling and converted to 3-channel
  RGB, as training pipelines carry them;
* ``28``: the native 28x28 grayscale (L) images.

Five measurements, each through the library's own public functions (no re-implementation); 3 to 5
are in ``recipes/bench_scale.py``, whose docstring describes them:

1. Shard to shard: `ue_datasets.apply.wds.protect_shards` with a fitted CUDA protection
   (``fit_convolution(10, key=0)``) against the same call with ``identity_protection()``, the floor:
   the same tar reading, PNG decoding, PNG re-encoding and tar writing, with no pixel changed. The input
   is webdataset shards (fields ``png`` + ``cls``) written with `write_samples` from the real images,
   PNG-encoded; ``ShardOptions(device="cpu", batch_size=--shard-batch)``, ``workers=1``,
   ``overwrite=True``, ``progress=False``. Reported: seconds, images/s, and protect/floor (target
   <= 1.10). Before timing, the protected shards are checked to hold, byte for byte, the pixels
   `protect_batch` gives for the same images, and the floor's the input pixels. Where the time goes:
   the tensor core alone on the same decoded images in memory, as the rewriter runs it (batches of
   ``--shard-batch``, one intra-op thread), against the floor.
2. In memory: one ``protect_batch(protection, x uint8 (B, C, H, W), labels)`` call against a Python
   loop calling ``Protect(protection)(image, int(label))`` on each of the same B images (B = 256):
   with the ``(C, H, W)`` uint8 tensors ``x[i]`` (contiguous), with PIL images (what a ``Dataset``
   transform gets), and with the ``(C, H, W)`` views that ``pil_to_tensor`` (like torchvision's
   ``PILToTensor``/``ToImage``) returns, whose strides are those of the HWC array. Reported: images/s
   and the speed-up batch/loop (target >= 10x at B = 256, against the contiguous-tensor loop). Before
   timing, every per-sample result is asserted equal to the batched result byte for byte. Since the
   CPU filter runs in the fused kernel, one image at a time, the per-sample loop is fast too, so at
   224x224, where the pixel work dominates, batching gains only a few times over it.
3. The fused CPU kernel against the torch passes, in memory (target >= 5,000 images/s at 224x224x3).
4. Output bytes / input bytes and images/s of ``--format png|webp|jpeg:95|jpeg:90`` on JPEG-q90 input
   shards at 224x224 and 512x512 (photo crops and upsampled Fashion-MNIST).
5. The Ray engine against the local engine on the same shards, on one machine (skipped without ray).

The machine is assumed noisy: every repeat runs all contenders of a measurement back to back, in an
order that alternates between repeats, after one untimed warm-up round; the figures are medians over
``--repeats`` and each ratio is the median of the per-repeat (paired) ratios; the fastest run of each
and their ratio are printed too (``best``), as a check on bursts of load from other processes. Shards go
to a temporary directory that is removed at the end. torch's intra-op thread count is left at its
default unless ``--threads`` sets it (printed either way).

A full default run takes about 4 minutes on 2 CPU cores; ``--quick`` is a smoke run of about 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bench_scale  # recipes/, beside this script
from bench_timing import environment, interleaved, mark, print_ratio, print_times, ratio, summary
from fashion_mnist import DEFAULT_ROOT, load, write_image_shards
from ue_datasets import fit_convolution, protect_batch
from ue_datasets.apply.core import identity_protection
from ue_datasets.apply.distribute import core_threads
from ue_datasets.apply.images import decode, pil_to_tensor
from ue_datasets.apply.shards import DEFAULT_BATCH_SIZE, ShardOptions
from ue_datasets.apply.wds import protect_shards, read_samples
from ue_datasets.transforms import Protect

SHARD_TARGET = 1.10  # protect / floor, at most
SPEEDUP_TARGET = 10.0  # batched / per-sample loop, at least
INPUT_PNG_LEVEL = 6  # PIL's default: what a typical shard writer leaves


# --------------------------------------------------------------------------- environment and data


def make_images(gray: np.ndarray, size: int) -> list[Image.Image]:
    """PIL images of the real 28x28 grayscale arrays: as they are (L) or bilinear-upsampled RGB."""
    out = []
    for a in gray:
        img = Image.fromarray(a, "L")
        if size != a.shape[0]:
            img = img.resize((size, size), Image.BILINEAR).convert("RGB")
        out.append(img)
    return out


def write_shards(images: list[Image.Image], labels: np.ndarray, per_shard: int, folder: Path) -> list[str]:
    """webdataset shards of ``KEY.png`` + ``KEY.cls`` written with the library's `write_samples`."""
    keys = [f"fmnist-{i:06d}" for i in range(len(images))]
    return write_image_shards(images, labels, keys, folder, "shard-{:05d}.tar", per_shard, INPUT_PNG_LEVEL)


def read_pixels(urls: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """Keys and decoded uint8 ``(C, H, W)`` images of every sample's ``png`` in ``urls``, in order."""
    keys, pixels = [], []
    for url in urls:
        with open(url, "rb") as f:
            for s in read_samples(f, url):
                keys.append(s["__key__"])
                pixels.append(pil_to_tensor(decode(s["png"])))
    return keys, pixels


# --------------------------------------------------------------------------- measurement 1: shards


def bench_shards(protection, gray, labels, size, n, per_shard, batch, repeats, tmp: Path) -> dict:
    images = make_images(gray[:n], size)
    urls = write_shards(images, labels[:n], per_shard, tmp / f"in-{size}")
    in_bytes = sum(os.path.getsize(u) for u in urls)
    options = ShardOptions(device="cpu", batch_size=batch)
    floor = identity_protection()
    out_protect, out_floor = str(tmp / f"out-{size}-protect"), str(tmp / f"out-{size}-floor")

    def run(p, out):
        stats = protect_shards(p, urls, out, options, workers=1, overwrite=True, progress=False)
        assert sum(s["written"] for s in stats) == n, stats

    contenders = {"protect": lambda: run(protection, out_protect), "floor": lambda: run(floor, out_floor)}
    contenders["protect"](), contenders["floor"]()

    # The real path gives what the core gives: protected shards hold protect_batch's pixels, the floor's
    # the input pixels, byte for byte.
    keys, original = read_pixels(urls)
    pkeys, protected = read_pixels([str(Path(out_protect) / Path(u).name) for u in urls])
    fkeys, floored = read_pixels([str(Path(out_floor) / Path(u).name) for u in urls])
    assert keys == pkeys == fkeys
    expected = protect_batch(protection, torch.stack(original), torch.as_tensor(labels[:n], dtype=torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(protected, expected)), "protect_shards != protect_batch"
    assert all(torch.equal(a, b) for a, b in zip(floored, original)), "identity shards changed pixels"
    assert not all(torch.equal(a, b) for a, b in zip(protected, original)), "protection changed nothing"

    # Where the time goes: the tensor core alone, as the rewriter runs it (lists of `batch` decoded images,
    # which lie as (H, W, C) arrays, one intra-op thread), in memory. It shares the 2 cores with the
    # codecs, so it adds about core / floor / 2 to protect / floor where it overlaps them, core / floor
    # where it does not.
    y = torch.as_tensor(labels[:n], dtype=torch.int64)

    def core():
        with core_threads("cpu"):
            for s in range(0, n, batch):
                protect_batch(protection, original[s : s + batch], y[s : s + batch])

    contenders["core"] = core
    times = interleaved(contenders, repeats)
    r = ratio(times["protect"], times["floor"])
    return {
        "size": size,
        "channels": int(original[0].shape[0]),
        "images": n,
        "shards": len(urls),
        "input_bytes": in_bytes,
        "batch_size": batch,
        "protect": summary(times["protect"], n),
        "floor": summary(times["floor"], n),
        "core": summary(times["core"], n),
        "protect_over_floor": r,
        "core_over_floor": ratio(times["core"], times["floor"]),
        "target_max": SHARD_TARGET,
        "meets_target": r["median"] <= SHARD_TARGET,
    }


# --------------------------------------------------------------------------- measurement 2: in memory


def bench_batch(protection, gray, labels, size, batch, repeats) -> dict:
    pils = make_images(gray[:batch], size)
    views = [pil_to_tensor(im) for im in pils]  # (C, H, W) views of HWC arrays, as from ToImage
    x = torch.stack(views)  # uint8 (B, C, H, W), contiguous
    tensors = list(x)  # x[i]: contiguous (C, H, W)
    y = torch.as_tensor(labels[:batch], dtype=torch.int64)
    ints = [int(v) for v in labels[:batch]]
    transform = Protect(protection)

    def batched():
        return protect_batch(protection, x, y)

    def loop_tensor():
        return [transform(t, lab)[0] for t, lab in zip(tensors, ints)]

    def loop_pil():
        return [transform(im, lab)[0] for im, lab in zip(pils, ints)]

    def loop_view():
        return [transform(t, lab)[0] for t, lab in zip(views, ints)]

    reference = batched()
    assert reference.dtype == torch.uint8 and reference.shape == x.shape
    assert not torch.equal(reference, x), "protection changed nothing"
    assert torch.equal(torch.stack(loop_tensor()), reference), "per-sample tensor results != batched result"
    assert torch.equal(torch.stack([pil_to_tensor(im) for im in loop_pil()]), reference), (
        "per-sample PIL results != batched result"
    )
    assert torch.equal(torch.stack(loop_view()), reference), "per-sample view results != batched result"

    contenders = {"batch": batched, "loop_tensor": loop_tensor, "loop_pil": loop_pil, "loop_view": loop_view}
    times = interleaved(contenders, repeats)
    result = {"size": size, "channels": int(x.shape[1]), "batch_size": batch}
    for name in contenders:
        result[name] = summary(times[name], batch)
    for name in ("loop_tensor", "loop_pil", "loop_view"):
        result[f"speedup_vs_{name}"] = ratio(times[name], times["batch"])
    sp = result["speedup_vs_loop_tensor"]["median"]
    result.update(target_min=SPEEDUP_TARGET, meets_target=sp >= SPEEDUP_TARGET)
    return result


# --------------------------------------------------------------------------- report


def print_shards(r: dict) -> None:
    label = f"{r['size']}x{r['size']}x{r['channels']}"
    print(f"\n[1] protect_shards, {label}: {r['images']} images in {r['shards']} shards "
          f"({r['input_bytes'] / 2**20:.1f} MiB), batch_size {r['batch_size']}, device cpu, workers 1")
    print_times("protect (CUDA)", r["protect"])
    print_times("floor (identity)", r["floor"])
    print_times("core alone, 1 thread", r["core"])
    target = f"(target <= {r['target_max']}: {mark(r['meets_target'])})"
    print_ratio("protect / floor", r["protect_over_floor"], target)
    print_ratio("core / floor", r["core_over_floor"], "(the core's share: 1 + this, without overlap)")


def print_batch(r: dict) -> None:
    label = f"{r['size']}x{r['size']}x{r['channels']}"
    print(f"\n[2] in memory, {label}: protect_batch on {r['batch_size']} images vs Protect per sample "
          "(all results equal byte for byte)")
    print_times("protect_batch", r["batch"])
    print_times("loop, CHW tensor", r["loop_tensor"])
    print_times("loop, PIL", r["loop_pil"])
    print_times("loop, HWC view", r["loop_view"])
    target = f"(target >= {r['target_min']:g}: {mark(r['meets_target'])})"
    print_ratio("speed-up vs tensor", r["speedup_vs_loop_tensor"], target)
    print_ratio("speed-up vs PIL", r["speedup_vs_loop_pil"])
    print_ratio("speed-up vs view", r["speedup_vs_loop_view"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (default 5)")
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 repeats: a smoke run")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's default)")
    ap.add_argument("--shard-batch", type=int, default=DEFAULT_BATCH_SIZE,
                    help=f"ShardOptions.batch_size (default {DEFAULT_BATCH_SIZE}, the CLI's)")
    ap.add_argument("--only", default="1,2,3,4,5", help="comma list of the measurements to run (default all)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    only = set(args.only.split(","))
    if not only <= {"1", "2", "3", "4", "5"}:
        ap.error(f"--only takes measurement numbers 1 to 5, got {args.only!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    repeats = min(args.repeats, 2) if args.quick else args.repeats
    # (size, images, images per shard) for measurement 1; batch of measurements 2 and 3; (size, images)
    # for 4; (files, images per file) for 5.
    shard_plan = [(224, 64, 32), (28, 512, 128)] if args.quick else [(224, 1024, 512), (28, 8192, 4096)]
    batch = 32 if args.quick else 256
    format_plan = [(224, 16), (512, 8)] if args.quick else [(224, 256), (512, 96)]
    ray_files, ray_per_file = (4, 8) if args.quick else (4, 128)

    env = environment()
    print("ue-datasets apply benchmark")
    print(f"  command      {env['command']}")
    print(f"  cpu          {env['cpu_model']} ({env['cpu_count']} logical cores)")
    threads = f"{env['torch_threads']} intra-op threads" + (" (--threads)" if args.threads else " (default)")
    print(f"  torch        {env['torch']}, {threads}; python {env['python']}, "
          f"pillow {env['pillow']}, numpy {env['numpy']}, ue-datasets {env['ue_datasets']}")
    print(f"  data         Fashion-MNIST test split from {args.root}")
    print(f"  repeats      {repeats} timed (+1 warm-up), interleaved; medians, ratios = median of paired ratios")

    gray, labels = load("test", args.root)
    labels = labels.astype(np.int64)  # a writable copy (the loader's arrays are read-only views)
    protection = fit_convolution(10, key=0)
    print(f"  protection   {protection.method} {protection.id[:12]} "
          f"(fit_convolution(10, key=0): kernel {protection.params['kernel_size']}, blur {protection.params['blur']})")

    started = time.perf_counter()
    results: dict = {"environment": env, "repeats": repeats, "quick": args.quick, "shards": [], "batch": [],
                     "formats": []}
    with tempfile.TemporaryDirectory(prefix="ue-bench-apply-") as tmp:
        for size, n, per_shard in shard_plan if "1" in only else ():
            r = bench_shards(protection, gray, labels, size, n, per_shard, args.shard_batch, repeats, Path(tmp))
            results["shards"].append(r)
            print_shards(r)
        for size in (224, 28) if "2" in only else ():
            r = bench_batch(protection, gray, labels, size, batch, repeats)
            results["batch"].append(r)
            print_batch(r)
        if "3" in only:
            results["kernel"] = bench_scale.bench_kernel(protection, make_images(gray[:batch], 224), labels, repeats)
            bench_scale.print_kernel(results["kernel"])
        for size, n in format_plan if "4" in only else ():
            sources = {"photo crops": bench_scale.photo_crops(size, n), "Fashion-MNIST": make_images(gray[:n], size)}
            for source, images in sources.items():
                results["formats"].append(bench_scale.bench_formats(protection, source, images, labels,
                                                                    args.shard_batch, repeats, Path(tmp)))
        if results["formats"]:
            bench_scale.print_formats(results["formats"])
        if "5" in only:
            n = ray_files * ray_per_file
            urls = write_shards(make_images(gray[:n], 224), labels[:n], ray_per_file, Path(tmp) / "in-ray")
            results["ray"] = bench_scale.bench_ray(protection, urls, n, args.shard_batch, repeats, Path(tmp))
            bench_scale.print_ray(results["ray"])
    results["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {results['total_seconds']:.0f} s")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
