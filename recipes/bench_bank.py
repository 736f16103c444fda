"""Benchmark of the noise bank (`ue_datasets.bank`): open cost, and lookup cost against decoding the image.

    python recipes/bench_bank.py [--entries 1000000] [--shape 1,28,28] [--batch 256] [--out DIR]
                                 [--small 10000] [--repeats 7] [--root /usr/share/datasets/fashion-mnist]

Builds two synthetic banks with `BankWriter.add_batch` in batches of ``--build-batch`` entries
(random int8 levels of ``--shape``, keys ``f"{i:08d}"``, random fake checksums): one of ``--small``
entries and one of ``--entries``. Then measures, in one run, contenders side by side:

(a) ``Bank.open`` of each bank (median of many opens, alternating between the banks): it reads the
    manifest and the index's header only, so it should not grow with the bank;
(b) lookup per sample: ``bank.find(keys, checksums)`` then ``bank.levels(rows)`` on random batches of
    ``--batch`` keys of the large bank (all present), reported as find, levels and their sum;
(c) reading the image itself: decoding a 28x28 grayscale PNG from bytes per sample, two ways:
    ``ue_datasets.apply.images.decode`` then ``pil_to_tensor`` (what every adapter does per image,
    with its format and size checks), and plain PIL (``Image.open`` + ``np.array``, the floor);
    real Fashion-MNIST test images when ``--root`` has them, else synthetic ones.

Also printed, for context: ``pixel_checksum`` per sample on the same batches (apply computes it for
every sample it looks up; it is not part of the bank's cost).

Each repeat runs (b), (c) and the checksum back to back in an alternating order; figures are medians
over ``--repeats``, the ratio lookup/decode the median of the per-repeat ratios. The shards were just
written, so they are in the page cache: this is the warm-cache cost (a cold cache adds a page fault
per entry read). Banks go to ``--out`` (kept) or to a temporary directory (removed at the end).

A default run (1M entries of 1x28x28, 784 MB of shards) takes about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import io
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ue_datasets.apply.images import decode, pil_to_tensor
from ue_datasets.bank import Bank, BankWriter
from ue_datasets.kernels.samples import pixel_checksum

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(directory: Path, n: int, shape: tuple[int, int, int], batch: int,
          seed: int) -> tuple[Bank, float, np.ndarray]:
    """A bank of ``n`` random entries; the bank, the seconds it took, and its checksums int64 ``(n, 2)``."""
    rng = np.random.default_rng(seed)
    sums = rng.integers(0, 2**40, size=(n, 2), dtype=np.int64)
    t0 = time.perf_counter()
    with BankWriter(directory) as w:
        for a in range(0, n, batch):
            b = min(n, a + batch)
            levels = torch.from_numpy(rng.integers(-8, 9, size=(b - a, *shape), dtype=np.int8))
            w.add_batch([f"{i:08d}" for i in range(a, b)], torch.from_numpy(sums[a:b]), levels)
    bank = Bank.open(directory)
    return bank, time.perf_counter() - t0, sums


def time_open(directories: dict[str, Path], rounds: int) -> dict[str, float]:
    """Median seconds of ``Bank.open`` of each directory over ``rounds`` opens, the banks alternating."""
    times: dict[str, list[float]] = {name: [] for name in directories}
    for r in range(rounds + 10):  # the first 10 rounds warm up
        for name, directory in (directories.items() if r % 2 else reversed(directories.items())):
            t0 = time.perf_counter()
            Bank.open(directory)
            if r >= 10:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def png_images(root: str, count: int, seed: int) -> list[bytes]:
    """``count`` 28x28 grayscale PNGs: Fashion-MNIST test images if ``root`` has them, else synthetic."""
    try:
        from fashion_mnist import load  # recipes/fashion_mnist.py, beside this script

        images, _ = load("test", root)
        arrays, source = [images[i] for i in range(count)], "Fashion-MNIST test images"
    except (OSError, FileNotFoundError, ImportError, KeyError):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:28, :28]
        arrays = [np.clip(128 + 90 * np.sin((xx + k) / 4) * np.cos(yy / 5) + rng.normal(0, 12, (28, 28)), 0, 255)
                  .astype(np.uint8) for k in range(count)]
        source = "synthetic images"
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a, "L").save(buf, format="PNG")
        out.append(buf.getvalue())
    print(f"decode input: {count} {source}, PNG, mean {statistics.mean(map(len, out)):.0f} bytes")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000, help="entries of the large bank (default 1000000)")
    p.add_argument("--small", type=int, default=10_000, help="entries of the small bank (default 10000)")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of every entry (default 1,28,28)")
    p.add_argument("--batch", type=int, default=256, help="lookup batch size (default 256)")
    p.add_argument("--build-batch", type=int, default=65536, help="entries per add_batch while building")
    p.add_argument("--batches", type=int, default=40, help="lookup batches per repeat (default 40)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (default 7)")
    p.add_argument("--opens", type=int, default=200, help="opens timed per bank (default 200)")
    p.add_argument("--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST folder for PNGs")
    p.add_argument("--out", default=None, help="directory for the banks (kept); default a temporary one, removed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        p.error("--shape must be C,H,W")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.machine()}, torch threads {torch.get_num_threads()}")

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_bank."))
    try:
        banks = {}
        for name, n in (("small", args.small), ("large", args.entries)):
            directory = root / f"bank-{n}"
            bank, seconds, sums = build(directory, n, shape, args.build_batch, args.seed + n)
            size = sum(f.stat().st_size for f in directory.iterdir())
            print(f"built {n:>9,} entries {args.shape}: {seconds:6.2f} s ({n / seconds:,.0f} entries/s, "
                  f"{size / 2**20:,.1f} MiB in {len(bank.manifest['shards'])} shard(s))")
            banks[name] = (bank, sums)

        print("\n(a) Bank.open, median of", args.opens)
        opened = time_open({name: b.directory for name, (b, _) in banks.items()}, args.opens)
        for name, (b, _) in banks.items():
            print(f"    {len(b):>9,} entries: {opened[name] * 1e6:8.1f} us")
        print(f"    large/small: {opened['large'] / opened['small']:.2f}x for "
              f"{len(banks['large'][0]) / len(banks['small'][0]):.0f}x the entries")

        bank, sums = banks["large"]
        rng = np.random.default_rng(args.seed)
        pngs = png_images(args.root, args.batch, args.seed)
        pixels = torch.stack([pil_to_tensor(decode(d)) for d in pngs])

        def lookup_batch():
            idx = rng.integers(0, len(bank), size=args.batch)
            keys = [f"{i:08d}" for i in idx]
            cs = torch.from_numpy(sums[idx])
            t0 = time.perf_counter()
            rows = bank.find(keys, cs)
            t1 = time.perf_counter()
            got = bank.levels(rows)
            t2 = time.perf_counter()
            assert (rows >= 0).all() and len(got) == args.batch
            return t1 - t0, t2 - t1

        def lookup():
            f = lv = 0.0
            for _ in range(args.batches):
                a, b = lookup_batch()
                f, lv = f + a, lv + b
            n = args.batches * args.batch
            return f / n, lv / n

        def decode_all():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                for d in pngs:
                    pil_to_tensor(decode(d))
            return (time.perf_counter() - t0) / (args.batches * len(pngs))

        def decode_pil():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                for d in pngs:
                    torch.from_numpy(np.array(Image.open(io.BytesIO(d))))
            return (time.perf_counter() - t0) / (args.batches * len(pngs))

        def checksum():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                pixel_checksum(pixels)
            return (time.perf_counter() - t0) / (args.batches * len(pixels))

        contenders = {"lookup": lookup, "decode": decode_all, "pil": decode_pil, "checksum": checksum}
        for f in contenders.values():  # warm-up
            f()
        rows = []
        for r in range(args.repeats):
            res = {}
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                res[name] = contenders[name]()
            rows.append(res)
        find_us = statistics.median(r["lookup"][0] for r in rows) * 1e6
        levels_us = statistics.median(r["lookup"][1] for r in rows) * 1e6
        lookup_us = statistics.median(sum(r["lookup"]) for r in rows) * 1e6
        decode_us = statistics.median(r["decode"] for r in rows) * 1e6
        pil_us = statistics.median(r["pil"] for r in rows) * 1e6
        checksum_us = statistics.median(r["checksum"] for r in rows) * 1e6
        ratio = statistics.median(sum(r["lookup"]) / r["decode"] for r in rows)
        ratio_pil = statistics.median(sum(r["lookup"]) / r["pil"] for r in rows)
        n = args.batches * args.batch
        print(f"\nper sample, {len(bank):,}-entry bank, batches of {args.batch}, "
              f"median of {args.repeats} x {n} samples")
        print(f"(b) lookup  find + levels  {lookup_us:7.2f} us   (find {find_us:.2f}, levels {levels_us:.2f})")
        print(f"(c) decode  PNG 28x28      {decode_us:7.2f} us   ue_datasets.apply.images.decode + pil_to_tensor")
        print(f"            PNG 28x28      {pil_us:7.2f} us   plain PIL Image.open + np.array")
        print(f"    ratio lookup/decode    {ratio:7.3f}   (lookup/plain PIL {ratio_pil:.3f})")
        print(f"    [context] pixel_checksum {checksum_us:.2f} us per sample (computed by apply, not the bank)")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
