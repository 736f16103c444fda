"""Unlearnable Clusters on real Fashion-MNIST, audited under the true labels and two other labellings.

    python recipes/uc_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] [--out recipes/out/uc_fashion_mnist]

The surrogate. The reference uses a CLIP RN50 (OpenAI weights) or an ImageNet ResNet-50; neither can
be downloaded here. The recipe trains its own surrogate **without labels**: a small CLIP-style
ModifiedResNet image tower (open_clip's RN architecture, the reference's CLIPRN50 family, shrunk to
layers (1, 1, 1, 1), width 32, 32-px input), trained with SimCLR on the training images only, and
saved as an open_clip ``local-dir:`` bundle (config, preprocessing and safetensors weights), the form
in which users bring local CLIP weights. It is meaningful as a surrogate because it sees the protector's
own data, never its labels, and its clusters follow visual similarity (the recipe prints their purity
with respect to the true classes, for information only: the protector never reads labels).

Then: fit Unlearnable Clusters (K = 10, eps 16/255) in both modes at the same compute (fast: 10 passes
over the data; faithful: one generator per cluster, 1 pass each, instead of the reference's 50: a CPU
budget), protect the training shards with each, and audit: a small CNN trained on clean and on
protected data, tested on the clean test set, with (a) the 10 true labels and (b) classes merged into
5 and 2 super-classes (``--relabel merge:N``: the attacker labels the data differently from anything
the protector saw). Sized for 2 CPU cores (about 30 minutes); every stage reuses its output on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

from ue_datasets.apply.clusters import fitted_table  # noqa: E402
from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402
from ue_datasets.artifact import load_protection  # noqa: E402
from ue_datasets.audit import AuditConfig, run_audit  # noqa: E402
from ue_datasets.audit.train import nt_xent, ssl_augment  # noqa: E402
from ue_datasets.fit import fit_clusters  # noqa: E402

MODEL = "ue-fmnist-rn"
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
LABELLINGS = {"10 true classes": None, "5 super-classes": "merge:5", "2 super-classes": "merge:2"}


def train_surrogate(images: torch.Tensor, bundle: Path, epochs: int, seed: int = 0) -> str:
    """SimCLR on uint8 ``(N, 1, 28, 28)`` images, no labels; saves a ``local-dir:`` bundle; returns its spec."""
    import open_clip
    from safetensors.torch import save_file

    spec = f"local-dir:{bundle.resolve()}"
    if (bundle / "open_clip_model.safetensors").exists():
        return spec
    cfg_dir = bundle.parent / "model-config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{MODEL}.json").write_text(json.dumps(MODEL_CFG))
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(images) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return ((x - MEAN) / STD).expand(-1, 3, -1, -1)

    model.visual.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(images) - 255, 256):
            x = images[order[i : i + 256]].float() / 255
            views = torch.cat([ssl_augment(x, g), ssl_augment(x, g)])
            loss = nt_xent(head(model.visual(prep(views))), temperature=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  surrogate SimCLR epoch {epoch + 1}/{epochs}: loss {total / (len(images) // 256):.3f}", flush=True)
    bundle.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": 32, "mean": [MEAN] * 3, "std": [STD] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    (bundle / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": preprocess},
                                                             indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bundle / "open_clip_model.safetensors")
    return spec


def purity(protection_dir: Path, keys: list[str], labels: np.ndarray) -> float:
    """Share of images whose cluster's majority class is their class (information only)."""
    table = fitted_table(load_protection(protection_dir))
    clusters = np.array([table[k][0] for k in keys])
    hits = sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters))
    return float(hits / len(keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="recipes/out/uc_fashion_mnist", help="output folder")
    ap.add_argument("--train-per-class", type=int, default=1000, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    ap.add_argument("--ssl-epochs", type=int, default=4, help="SimCLR epochs of the surrogate")
    ap.add_argument("--fast-epochs", type=int, default=10, help="passes over the data, fast mode")
    ap.add_argument("--faithful-epochs", type=int, default=1, help="passes per cluster, faithful mode")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per audit training run")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 50/20 per class, 1 epoch everywhere")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class = 50, 20
        args.ssl_epochs = args.fast_epochs = args.faithful_epochs = args.epochs = 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    out = Path(args.out)
    train_x, train_y = load("train", args.root)
    test_x, test_y = load("test", args.root)
    index = balanced(train_y, args.train_per_class)
    clean = write_shards(train_x, train_y, index, out / "data" / "clean", "train")
    write_shards(test_x, test_y, balanced(test_y, args.test_per_class), out / "data" / "test", "test")
    keys, labels = [f"train-{i:05d}" for i in index], train_y[index].astype(np.int64)

    t = time.perf_counter()
    spec = train_surrogate(torch.from_numpy(train_x[index].copy())[:, None], out / "surrogate", args.ssl_epochs)
    timings = {"surrogate (SimCLR)": time.perf_counter() - t}

    modes = {"fast": args.fast_epochs, "faithful": args.faithful_epochs}
    purities = {}
    for mode, epochs in modes.items():
        art = out / f"protection-{mode}"
        if not (art / "manifest.json").exists():
            t = time.perf_counter()
            p = fit_clusters(str(out / "data" / "clean"), spec, clusters=10, mode=mode, epochs=epochs, device="cpu",
                             cache_dir=out / f"cache-{mode}", seed=0)
            p.save(art, overwrite=True)
            timings[f"fit {mode}"] = time.perf_counter() - t
        purities[mode] = purity(art, keys, labels)
        folder = out / "data" / f"protected-{mode}"
        protect_shards(load_protection(art), clean, str(folder), ShardOptions(device="cpu"), progress=False)

    reports: dict[str, dict[str, dict]] = {}
    for name, relabel in LABELLINGS.items():
        config = AuditConfig(epochs=args.epochs, defenses=("none",), device="cpu", relabel=relabel)
        for mode in modes:
            print(f"[audit] {name}, {mode} ...", flush=True)
            reports.setdefault(name, {})[mode] = run_audit(
                str(out / "data" / f"protected-{mode}"), str(out / "data" / "clean"), str(out / "data" / "test"),
                out / f"report-{mode}-{relabel or 'true'}".replace(":", ""), config)
            config = replace(config, baseline=False)  # the clean baseline of this labelling is trained once

    def cell(report: dict, which: str) -> str:
        r = next(r for r in report["results"] if r["training_set"] == which)
        return f"**{100 * r['peak']:.1f}** / {100 * r['final']:.1f}" if which != "clean" else \
            f"{100 * r['peak']:.1f} / {100 * r['final']:.1f}"

    lines = ["| attacker's labels | clean data | UC fast | UC faithful |", "|---|---|---|---|"]
    for name, by_mode in reports.items():
        lines.append(f"| {name} | {cell(by_mode['fast'], 'clean')} | {cell(by_mode['fast'], 'protected')} | "
                     f"{cell(by_mode['faithful'], 'protected')} |")
    imp = {m: reports["10 true classes"][m]["imperceptibility"] for m in modes}
    lines += ["", "| | UC fast | UC faithful |", "|---|---|---|"]
    lines.append("| PSNR dB (mean / worst) | " + " | ".join(
        f"{imp[m]['psnr']['mean']:.1f} / {imp[m]['psnr']['worst']:.1f}" for m in modes) + " |")
    lines.append("| SSIM (mean / worst) | " + " | ".join(
        f"{imp[m]['ssim']['mean']:.3f} / {imp[m]['ssim']['worst']:.3f}" for m in modes) + " |")
    lines.append("| L-inf (max, /255) | " + " | ".join(f"{imp[m]['linf']['worst']:.0f}" for m in modes) + " |")
    lines.append("| cluster purity w.r.t. true classes | " + " | ".join(f"{100 * purities[m]:.1f} %" for m in modes) + " |")
    text = "\n".join(lines)
    meta = (f"Fashion-MNIST, {10 * args.train_per_class} training / {10 * args.test_per_class} test images "
            f"(class-balanced); surrogate: tiny CLIP ModifiedResNet, SimCLR {args.ssl_epochs} epochs, no labels; "
            f"UC K=10, eps 16/255, fast {args.fast_epochs} passes, faithful {args.faithful_epochs} pass per cluster; "
            f"audit: small-cnn, {args.epochs} epochs, SGD 0.05 cosine, seed 0, CPU; clean test accuracy %, "
            f"**peak** / final. Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; {time.perf_counter() - start:.0f} s in all.")
    (out / "table.md").write_text(meta + "\n\n" + text + "\n")
    print(meta)
    print(text)


if __name__ == "__main__":
    main()
