"""The results table: audit every method on real Fashion-MNIST, under every CPU-affordable defense.

    python recipes/audit_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] [--out recipes/out/audit]

Real data: the Debian package ``dataset-fashion-mnist`` (or a folder with the IDX files). The recipe
takes a class-balanced subset of the training set and of the test set, writes them as webdataset
shards, protects the training shards with each method through the library's real path
(`protect_shards`), and runs `run_audit` (what ``ue-datasets audit`` runs) per method: the same model
trained on the clean and on the protected training set, under each defense, evaluated on the clean
test set after every epoch. It prints a markdown table (peak / final accuracy) and writes it, with
every report, under ``--out``. Sized to finish within an hour on 2 CPU cores.

Methods so far: CUDA (``convolution``). Grayscale is not among the defenses: Fashion-MNIST is
grayscale already, so it would change nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

from ue_datasets import fit_convolution  # noqa: E402
from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402
from ue_datasets.audit import AuditConfig, run_audit  # noqa: E402

DEFENSES = ("none", "jpeg:10", "bdr:2", "median:3", "blur:0.1", "blur:1.0", "upload:75", "augment", "at:8")
#: Private key of the recipe's CUDA protection (a recipe's key is public; yours must not be).
KEY = 20230304


def table(reports: dict[str, dict]) -> str:
    """Rows: defenses; columns: the clean-trained baseline and each method (peak / final, %)."""
    methods = list(reports)
    first = reports[methods[0]]
    head = "| defense | clean data | " + " | ".join(f"{m}" for m in methods) + " |"
    lines = [head, "|---|---|" + "---|" * len(methods)]
    for d in dict.fromkeys(r["defense"] for r in first["results"]):
        cells = []
        clean = next(r for r in first["results"] if r["defense"] == d and r["training_set"] == "clean")
        for m in methods:
            r = next(r for r in reports[m]["results"] if r["defense"] == d and r["training_set"] == "protected")
            cells.append(f"**{100 * r['peak']:.1f}** / {100 * r['final']:.1f}")
        lines.append(f"| {d} | {100 * clean['peak']:.1f} / {100 * clean['final']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="recipes/out/audit_fashion_mnist", help="output folder")
    ap.add_argument("--train-per-class", type=int, default=1000, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per training run")
    ap.add_argument("--defenses", default=",".join(DEFENSES), help="comma list of defenses")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 100/20 per class, 2 epochs, 3 defenses")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.epochs, args.defenses = 100, 20, 2, "none,jpeg:10,augment"
    start = time.perf_counter()
    out = Path(args.out)
    train_x, train_y = load("train", args.root)
    test_x, test_y = load("test", args.root)
    clean = write_shards(train_x, train_y, balanced(train_y, args.train_per_class), out / "data" / "clean", "train")
    write_shards(test_x, test_y, balanced(test_y, args.test_per_class), out / "data" / "test", "test")

    protections = {"CUDA": fit_convolution(10, key=KEY)}
    config = AuditConfig(epochs=args.epochs, defenses=tuple(args.defenses.split(",")), device="cpu")
    reports = {}
    for name, protection in protections.items():
        folder = out / "data" / f"protected-{name.lower()}"
        protect_shards(protection, clean, str(folder), ShardOptions(device="cpu"), progress=False)
        print(f"[{name}] protected {len(clean)} shards -> {folder}; auditing...", flush=True)
        reports[name] = run_audit(str(folder), str(out / "data" / "clean"), str(out / "data" / "test"),
                                  out / f"report-{name.lower()}", config)
        config = replace(config, baseline=False)  # later methods reuse the first one's clean-trained baseline
    text = table(reports)
    meta = (f"Fashion-MNIST, {10 * args.train_per_class} training / {10 * args.test_per_class} test images "
            f"(class-balanced), small-cnn, {args.epochs} epochs, SGD 0.05 cosine, seed 0, CPU; "
            f"clean test accuracy %, **peak** / final. {time.perf_counter() - start:.0f} s in all.")
    (out / "table.md").write_text(meta + "\n\n" + text + "\n")
    (out / "imperceptibility.json").write_text(json.dumps({m: r["imperceptibility"] for m, r in reports.items()}, indent=2))
    print(meta)
    print(text)


if __name__ == "__main__":
    main()
