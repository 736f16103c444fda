"""Benchmark of stage 3 (apply) on real Fashion-MNIST images, on CPU, contenders measured side by side.

    python recipes/bench_apply.py [--root /usr/share/datasets/fashion-mnist] [--repeats 5]
                                  [--quick] [--threads N] [--shard-batch 64] [--json PATH]

Two image sizes, both from the real Fashion-MNIST test split:

* ``224``: 28x28 images upsampled to 224x224 with PIL bilinear resampling and converted to 3-channel
  RGB, as training pipelines carry them;
* ``28``: the native 28x28 grayscale (L) images.

Two measurements, each through the library's own public functions (no re-implementation):

1. Shard to shard: `ue_datasets.apply.wds.protect_shards` with a fitted CUDA protection
   (``fit_convolution(10, key=0)``) against the same call with ``identity_protection()``, the floor:
   the same tar reading, PNG decoding, PNG re-encoding and tar writing, with no pixel changed. The input
   is webdataset shards (fields ``png`` + ``cls``) written with `write_samples` from the real images,
   PNG-encoded; ``ShardOptions(device="cpu", batch_size=--shard-batch)``, ``workers=1``,
   ``overwrite=True``, ``progress=False``. Reported: seconds, images/s, and protect/floor (target
   <= 1.15). Before timing, the protected shards are checked to hold, byte for byte, the pixels
   `protect_batch` gives for the same images, and the floor's the input pixels.
2. In memory: one ``protect_batch(protection, x uint8 (B, C, H, W), labels)`` call against a Python
   loop calling ``Protect(protection)(image, int(label))`` on each of the same B images (B = 256):
   with the ``(C, H, W)`` uint8 tensors ``x[i]`` (contiguous), with PIL images (what a ``Dataset``
   transform gets), and with the ``(C, H, W)`` views that ``pil_to_tensor`` (like torchvision's
   ``PILToTensor``/``ToImage``) returns, whose strides are those of the HWC array. Reported: images/s
   and the speed-up batch/loop (target >= 10x at B = 256, against the contiguous-tensor loop). Before
   timing, every per-sample result is asserted equal to the batched result byte for byte.

The machine is assumed noisy: every repeat runs all contenders of a measurement back to back, in an
order that alternates between repeats, after one untimed warm-up round; the figures are medians over
``--repeats`` and each ratio is the median of the per-repeat (paired) ratios; the fastest run of each
and their ratio are printed too (``best``), as a check on bursts of load from other processes. Shards go
to a temporary directory that is removed at the end. torch's intra-op thread count is left at its
default unless ``--threads`` sets it (printed either way).

A full default run takes about 1.5 minutes on 2 CPU cores; ``--quick`` is a smoke run of about 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

import ue_datasets
from fashion_mnist import DEFAULT_ROOT, load, write_png_shards  # recipes/fashion_mnist.py, beside this script
from ue_datasets import fit_convolution, protect_batch
from ue_datasets.apply.core import identity_protection
from ue_datasets.apply.images import decode, pil_to_tensor
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards, read_samples
from ue_datasets.transforms import Protect

SHARD_TARGET = 1.15  # protect / floor, at most
SPEEDUP_TARGET = 10.0  # batched / per-sample loop, at least
INPUT_PNG_LEVEL = 6  # PIL's default: what a typical shard writer leaves


# --------------------------------------------------------------------------- environment and data


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "ue_datasets": ue_datasets.__version__,
    }


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
    return write_png_shards(images, labels, keys, folder, "shard-{:05d}.tar", per_shard, INPUT_PNG_LEVEL)


def read_pixels(urls: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """Keys and decoded uint8 ``(C, H, W)`` images of every sample's ``png`` in ``urls``, in order."""
    keys, pixels = [], []
    for url in urls:
        with open(url, "rb") as f:
            for s in read_samples(f, url):
                keys.append(s["__key__"])
                pixels.append(pil_to_tensor(decode(s["png"])))
    return keys, pixels


# --------------------------------------------------------------------------- timing


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each contender per repeat; one untimed warm-up round, order alternating per repeat."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(num: list[float], den: list[float]) -> dict:
    """``median``: median of the paired per-repeat ratios; ``best``: fastest over fastest."""
    paired = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(paired), "best": min(num) / min(den), "paired": paired}


def summary(times: list[float], n: int) -> dict:
    med = statistics.median(times)
    return {"seconds": times, "median_s": med, "best_s": min(times), "images_per_s": n / med}


def spread(values: list[float]) -> str:
    return f"[{min(values):.3g}..{max(values):.3g}]"


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
        "protect_over_floor": r,
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


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_times(title: str, s: dict) -> None:
    runs = "..".join(f"{1e3 * t:.4g}" for t in (min(s["seconds"]), max(s["seconds"])))
    print(f"    {title:20s} {1e3 * s['median_s']:10.2f} ms  {s['images_per_s']:9.1f} img/s   "
          f"best {1e3 * s['best_s']:.4g} ms   runs [{runs}] ms")


def print_ratio(title: str, r: dict, target: str = "") -> None:
    print(f"    {title:20s} {r['median']:8.2f}x {target}  best/best {r['best']:.2f}x   paired {spread(r['paired'])}")


def print_shards(r: dict) -> None:
    label = f"{r['size']}x{r['size']}x{r['channels']}"
    print(f"\n[1] protect_shards, {label}: {r['images']} images in {r['shards']} shards "
          f"({r['input_bytes'] / 2**20:.1f} MiB), batch_size {r['batch_size']}, device cpu, workers 1")
    print_times("protect (CUDA)", r["protect"])
    print_times("floor (identity)", r["floor"])
    target = f"(target <= {r['target_max']}: {mark(r['meets_target'])})"
    print_ratio("protect / floor", r["protect_over_floor"], target)


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
    ap.add_argument("--shard-batch", type=int, default=64, help="ShardOptions.batch_size (default 64, the CLI's)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    repeats = min(args.repeats, 2) if args.quick else args.repeats
    # (size, images, images per shard) for measurement 1; batch of measurement 2.
    shard_plan = [(224, 64, 32), (28, 512, 128)] if args.quick else [(224, 1024, 512), (28, 8192, 4096)]
    batch = 32 if args.quick else 256

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
    results: dict = {"environment": env, "repeats": repeats, "quick": args.quick, "shards": [], "batch": []}
    with tempfile.TemporaryDirectory(prefix="ue-bench-apply-") as tmp:
        for size, n, per_shard in shard_plan:
            r = bench_shards(protection, gray, labels, size, n, per_shard, args.shard_batch, repeats, Path(tmp))
            results["shards"].append(r)
            print_shards(r)
    for size in (224, 28):
        r = bench_batch(protection, gray, labels, size, batch, repeats)
        results["batch"].append(r)
        print_batch(r)
    results["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {results['total_seconds']:.0f} s")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
