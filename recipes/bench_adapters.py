"""What each adapter costs against unprotected loading, on real Fashion-MNIST, on CPU, side by side.

    python recipes/bench_adapters.py [--root /usr/share/datasets/fashion-mnist] [--images 2048]
                                     [--repeats 5] [--quick] [--threads N] [--json PATH]

Data: the first ``--images`` 28x28 grayscale images of the Fashion-MNIST test split and their labels.
Protection: ``fit_convolution(10, key=0)`` (CUDA), computed on CPU. Each measurement runs the same
pipeline over the same images with and without protection:

a. ``ProtectedDataset``: a torchvision-style dataset (``Image.fromarray(array, "L")`` per item, as
   ``torchvision.datasets.FashionMNIST`` does) through ``DataLoader(batch_size=256, num_workers=0)``,
   then ``v2.ToImage()`` and ``v2.ToDtype(float32, scale=True)``; against the plain dataset with the
   same transform. Also the same wrapper fetched sample by sample (``__getitems__`` hidden), as before
   it batched.
b. ``Protect`` first in the ``v2.Compose`` that the dataset applies to ``(image, label)``, against the
   Compose without it (same loader).
c. ``ProtectBatch(p).collate`` as the loader's ``collate_fn`` on uint8 tensors, against
   ``default_collate``.
d. ``protect_dataset`` on a ``datasets.Dataset`` of PNG bytes (``Image`` and ``ClassLabel`` features,
   in memory, no cache) at ``batch_size`` 64, 256, 1000 and 4000, against the same call with
   ``identity_protection()`` at 1000: the floor that decodes and re-encodes every PNG and changes no
   pixel.
e. ``ue_datasets.apply.wds.protect_shards`` over PNG shards (1024 images each) with
   ``ShardOptions(batch_size=64 / 256 / 1000, device="cpu")``, against the identity floor at 1000.

Before timing, every protected output is checked to hold, byte for byte, the pixels ``protect_batch``
gives for the same images (the floors: the input pixels). Timing follows ``recipes/bench_apply.py``:
all contenders of a measurement run back to back in an order alternating per repeat, after one untimed
warm-up round; figures are medians, each ratio the median of the per-repeat (paired) ratios. A default
run takes about 2.5 minutes on 2 busy CPU cores; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from bench_apply import INPUT_PNG_LEVEL, make_images, read_pixels, write_shards  # recipes/, beside this script
from bench_timing import environment, interleaved, ratio, summary
from fashion_mnist import DEFAULT_ROOT, load
from ue_datasets import fit_convolution, protect_batch
from ue_datasets.apply.core import identity_protection
from ue_datasets.apply.hf import protect_dataset
from ue_datasets.apply.images import decode, encode_png, pil_to_tensor
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards
from ue_datasets.transforms import Protect, ProtectBatch, ProtectedDataset

LOADER_BATCH = 256
HF_BATCHES = (64, 256, 1000, 4000)
SHARD_BATCHES = (64, 256, 1000)
FLOOR_BATCH = 1000
PER_SHARD = 1024


class FashionMNISTLike(Dataset):
    """``(PIL L image, int label)`` items made as ``torchvision.datasets.FashionMNIST`` makes them,
    with its ``transform`` (image) or a joint ``transforms`` (image, label)."""

    def __init__(self, gray: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
                 transforms: Callable | None = None):
        self.gray, self.labels, self.transform, self.transforms = gray, labels, transform, transforms

    def __len__(self) -> int:
        return len(self.gray)

    def __getitem__(self, i: int):
        img, label = Image.fromarray(self.gray[i], mode="L"), int(self.labels[i])
        if self.transform is not None:
            img = self.transform(img)
        return (img, label) if self.transforms is None else self.transforms(img, label)


class PerSample(ProtectedDataset):
    """`ProtectedDataset` fetched one `__getitem__` at a time (the DataLoader skips a false ``__getitems__``)."""

    __getitems__ = None  # type: ignore[assignment]


def to_float() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def epoch(dataset: Dataset, collate_fn: Callable = default_collate) -> list:
    return list(DataLoader(dataset, batch_size=LOADER_BATCH, num_workers=0, collate_fn=collate_fn))


def as_uint8(batches: list) -> torch.Tensor:
    x = torch.cat([b[0].as_subclass(torch.Tensor) for b in batches])
    return x if x.dtype == torch.uint8 else x.mul(255).round().to(torch.uint8)


def check_loaders(runs: dict[str, Callable[[], list]], plain: str, pixels: torch.Tensor, expected: torch.Tensor,
                  labels: torch.Tensor) -> None:
    for name, run in runs.items():
        batches = run()
        assert torch.equal(torch.cat([b[1] for b in batches]), labels), name
        assert torch.equal(as_uint8(batches), pixels if name == plain else expected), f"{name}: wrong pixels"


def measure(title: str, runs: dict[str, Callable[[], object]], n: int, base: str, repeats: int) -> dict:
    times = interleaved(runs, repeats)
    rows = {name: summary(times[name], n) | {"over_base": ratio(times[name], times[base])} for name in runs}
    return {"title": title, "images": n, "base": base, "rows": rows}


# --------------------------------------------------------------------------- (a) (b) (c): DataLoaders


def bench_loaders(protection, gray, labels, repeats) -> list[dict]:
    y = torch.as_tensor(labels, dtype=torch.int64)
    pixels = torch.as_tensor(gray)[:, None]
    expected = protect_batch(protection, pixels, y)
    n = len(gray)

    a = {
        "plain dataset": lambda: epoch(FashionMNISTLike(gray, labels, transform=to_float())),
        "ProtectedDataset": lambda: epoch(ProtectedDataset(FashionMNISTLike(gray, labels), protection, to_float())),
        "ProtectedDataset per sample": lambda: epoch(PerSample(FashionMNISTLike(gray, labels), protection, to_float())),
    }
    b = {
        "Compose": lambda: epoch(FashionMNISTLike(gray, labels, transforms=v2.Compose([to_float()]))),
        "Compose with Protect": lambda: epoch(
            FashionMNISTLike(gray, labels, transforms=v2.Compose([Protect(protection), to_float()]))),
    }
    collate = ProtectBatch(protection).collate
    c = {
        "default_collate": lambda: epoch(FashionMNISTLike(gray, labels, transform=v2.ToImage())),
        "ProtectBatch.collate": lambda: epoch(FashionMNISTLike(gray, labels, transform=v2.ToImage()), collate),
    }
    results = []
    for title, runs, base in (("(a) ProtectedDataset in a DataLoader", a, "plain dataset"),
                              ("(b) Protect in a v2.Compose", b, "Compose"),
                              ("(c) ProtectBatch.collate", c, "default_collate")):
        check_loaders(runs, base, pixels, expected, y)
        results.append(measure(f"{title} (batch {LOADER_BATCH}, num_workers 0)", runs, n, base, repeats))
    return results


# --------------------------------------------------------------------------- (d) datasets.map


def bench_hf(protection, pngs, labels, expected, repeats) -> dict:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels.tolist()}, features=features)
    floor = identity_protection()

    def run(p, batch_size):
        return protect_dataset(ds, p, batch_size=batch_size, device="cpu", keep_in_memory=True,
                               load_from_cache_file=False)

    runs = {f"identity, batch {FLOOR_BATCH}": lambda: run(floor, FLOOR_BATCH)}
    runs |= {f"protect, batch {b}": (lambda b=b: run(protection, b)) for b in HF_BATCHES}
    original = torch.stack([pil_to_tensor(decode(b)) for b in pngs])
    for name, fn in runs.items():
        out = fn().cast_column("image", datasets.Image(decode=False))
        got = torch.stack([pil_to_tensor(decode(cell["bytes"])) for cell in out["image"]])
        assert torch.equal(got, original if name.startswith("identity") else expected), f"{name}: wrong pixels"
    return measure("(d) protect_dataset (datasets.map, in memory, device cpu)", runs, len(pngs),
                   f"identity, batch {FLOOR_BATCH}", repeats)


# --------------------------------------------------------------------------- (e) shard rewriter


def bench_shards(protection, images, labels, expected, repeats, tmp: Path) -> dict:
    urls = write_shards(images, labels, PER_SHARD, tmp / "in")
    floor = identity_protection()

    def run(p, batch_size, out):
        options = ShardOptions(device="cpu", batch_size=batch_size)
        stats = protect_shards(p, urls, str(out), options, workers=1, overwrite=True, progress=False)
        assert sum(s["written"] for s in stats) == len(images), stats
        return [str(out / Path(u).name) for u in urls]

    runs = {f"identity, batch {FLOOR_BATCH}": lambda: run(floor, FLOOR_BATCH, tmp / "floor")}
    runs |= {f"protect, batch {b}": (lambda b=b: run(protection, b, tmp / f"out-{b}")) for b in SHARD_BATCHES}
    _, original = read_pixels(urls)
    for name, fn in runs.items():
        _, got = read_pixels(fn())
        assert torch.equal(torch.stack(got), torch.stack(original) if name.startswith("identity") else expected), name
    return measure(f"(e) protect_shards ({len(urls)} PNG shards, workers 1, device cpu)", runs, len(images),
                   f"identity, batch {FLOOR_BATCH}", repeats)


# --------------------------------------------------------------------------- report


def print_result(r: dict) -> None:
    print(f"\n{r['title']}: {r['images']} images; ratio = time / time of '{r['base']}'")
    for name, row in r["rows"].items():
        q = row["over_base"]
        paired = f"[{min(q['paired']):.2f}..{max(q['paired']):.2f}]"
        print(f"    {name:30s} {row['images_per_s']:9.0f} img/s   {q['median']:6.2f}x   paired {paired}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--images", type=int, default=2048, help="test images per measurement (default 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (default 5)")
    ap.add_argument("--quick", action="store_true", help="512 images and 2 repeats: a smoke run")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's default)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args()
    if args.repeats < 1 or args.images < 1:
        ap.error("--repeats and --images must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n, repeats = (min(args.images, 512), min(args.repeats, 2)) if args.quick else (args.images, args.repeats)
    datasets.disable_progress_bars()

    env = environment()
    print("ue-datasets adapter benchmark: protected against unprotected loading")
    print(f"  command      {env['command']}")
    print(f"  cpu          {env['cpu_model']} ({env['cpu_count']} logical cores), torch {env['torch']} with "
          f"{env['torch_threads']} threads, datasets {datasets.__version__}, ue-datasets {env['ue_datasets']}")
    print(f"  data         {n} Fashion-MNIST test images (28x28 L) from {args.root}")
    print(f"  repeats      {repeats} timed (+1 warm-up), interleaved; medians, ratios = median of paired ratios")

    gray, labels = load("test", args.root)
    gray, labels = gray[:n].copy(), labels[:n].astype(np.int64)
    protection = fit_convolution(10, key=0)
    images = make_images(gray, 28)
    pngs = [encode_png(im, INPUT_PNG_LEVEL) for im in images]
    expected = protect_batch(protection, torch.as_tensor(gray)[:, None], torch.as_tensor(labels))

    started = time.perf_counter()
    results = bench_loaders(protection, gray, labels, repeats)
    for r in results:
        print_result(r)
    results.append(bench_hf(protection, pngs, labels, expected, repeats))
    print_result(results[-1])
    with tempfile.TemporaryDirectory(prefix="ue-bench-adapters-") as tmp:
        results.append(bench_shards(protection, images, labels, expected, repeats, Path(tmp)))
    print_result(results[-1])
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "repeats": repeats, "results": results,
                                               "total_seconds": total}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
