"""T2UE on real Fashion-MNIST: noise from class-name prompts alone, audited beside EM, and a retrieval check.

    python recipes/t2ue_fashion_mnist.py [--root /usr/share/datasets/fashion-mnist] \
        [--out recipes/out/t2ue_fashion_mnist]

No pretrained CLIP can be downloaded here, so the recipe makes the CLIP T2UE trains against: a small
open_clip CLIP (a ModifiedResNet image tower with layers (1, 1, 1, 1), width 32, 32-px input; a 2-layer
text transformer, context 16) trained from scratch on the training pairs, whose captions are the class
names in CLIP's 18 prompt templates (one template per image, picked by its key). It is saved as an
open_clip ``local-dir:`` bundle and given to ``fit_t2ue`` as any user's CLIP would be.

Stages (each reuses its output on a rerun):

1. shards of (image, ``cls``, ``txt`` caption); the small CLIP, and how well it retrieves before any
   protection (class-level recall@1/5 both ways on the test pairs);
2. ``fit_t2ue`` against it on the training pairs (class-wise mode), then the same generator in the
   sample-wise mode (``init=..., epochs=0``);
3. protected training sets: class-wise with class-name prompts (``"a photo of a {name}."`` from ``cls``),
   sample-wise (templates and latents by sample key), and by caption (each sample's ``txt``); EM class-wise
   at the same 8/255 budget beside them;
4. the audit (small CNN, clean test set) under ``none``, ``jpeg:10`` and ``augment`` (``--defenses``);
5. the retrieval check: a fresh small CLIP trained from scratch on the caption-protected pairs vs one
   trained on the clean pairs (same recipe, seed 1), class-level recall@1/5 both ways on the clean test pairs.

Recall here is class-level: captions repeat (10 classes x 18 templates), so a retrieved caption (image)
is a hit when it names (shows) the query's class.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_clip  # noqa: E402
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

from ue_datasets.apply.images import image_tensor  # noqa: E402
from ue_datasets.apply.records import iter_records  # noqa: E402
from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.texts import TEMPLATES, template_for_key  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402
from ue_datasets.artifact import load_protection  # noqa: E402
from ue_datasets.audit import AuditConfig, run_audit  # noqa: E402
from ue_datasets.fit import fit_em  # noqa: E402
from ue_datasets.fit.t2ue import fit_t2ue, multi_positive_infonce  # noqa: E402
from ue_datasets.kernels.samples import colour_planes  # noqa: E402

NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MODEL = "ue-fmnist-clip"
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
DEFENSES = ("none", "jpeg:10", "augment")
SETS = ("t2ue-class", "t2ue-sample", "t2ue-caption", "em-class")


def caption(label: int, key: str) -> str:
    """A training caption: the class name in the template the sample-wise mode would pick for ``key``."""
    return template_for_key(TEMPLATES, key).format(name=NAMES[label])


def pairs(folder: Path) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """uint8 ``(N, 1, 28, 28)`` images, their captions and labels, from a folder of shards."""
    xs, texts, ys = [], [], []
    for r in iter_records(str(folder), text_field="txt", labels=True):
        xs.append(colour_planes(image_tensor(r.image)))
        texts.append(r.text.decode())
        ys.append(int(r.label))
    return torch.stack(xs), texts, torch.tensor(ys)


def train_clip(folder: Path, bundle: Path, epochs: int, seed: int) -> str:
    """A small CLIP trained from scratch on the pairs in ``folder``; saved as a ``local-dir:`` bundle."""
    import open_clip

    if small_clip.is_saved(bundle):
        return small_clip.spec_of(bundle)
    small_clip.register(MODEL, MODEL_CFG, bundle)
    images, texts, _ = pairs(folder)
    tokens = open_clip.get_tokenizer(MODEL)(texts)
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL, pretrained=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    steps = epochs * (len(images) // 256)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order, total = torch.randperm(len(images), generator=g), 0.0
        for i in range(0, len(images) - 255, 256):
            idx = order[i : i + 256]
            fi = F.normalize(model.encode_image(small_clip.prep(images[idx].float() / 255)), dim=-1)
            ft = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            loss = multi_positive_infonce(fi, ft, [texts[j] for j in idx.tolist()], model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            total += loss.item()
        print(f"  CLIP (seed {seed}) epoch {epoch + 1}/{epochs}: loss {total / (len(images) // 256):.3f}", flush=True)
    return small_clip.save(model.eval(), MODEL_CFG, bundle)


@torch.inference_mode()
def retrieval(spec: str, test: Path) -> dict[str, float]:
    """Class-level recall@1/5 of a CLIP on the test pairs: image -> the distinct test captions, and caption
    -> the test images."""
    from ue_datasets.encoders import load_encoder
    from ue_datasets.encoders.text import load_text_encoder

    images, texts, labels = pairs(test)
    image_encoder, text_encoder = load_encoder(spec), load_text_encoder(spec)
    fi = F.normalize(image_encoder.encode(images), dim=-1)
    distinct = list(dict.fromkeys(texts))
    label_of = {t: labels[texts.index(t)] for t in distinct}
    ft = F.normalize(text_encoder.encode(distinct), dim=-1)
    caption_labels = torch.stack([label_of[t] for t in distinct])
    q = F.normalize(text_encoder.encode(texts), dim=-1)
    out = {}
    for k in (1, 5):
        top = (fi @ ft.T).topk(k, dim=1).indices  # images -> captions
        out[f"i2t_r{k}"] = 100 * float((caption_labels[top] == labels[:, None]).any(1).float().mean())
        top = (q @ fi.T).topk(k, dim=1).indices  # captions -> images
        out[f"t2i_r{k}"] = 100 * float((labels[top] == labels[:, None]).any(1).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--out", default="recipes/out/t2ue_fashion_mnist", help="output folder")
    ap.add_argument("--train-per-class", type=int, default=600, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class")
    ap.add_argument("--clip-epochs", type=int, default=10, help="epochs of each small CLIP")
    ap.add_argument("--t2ue-epochs", type=int, default=20, help="generator epochs")
    ap.add_argument("--resolution", type=int, default=16, help="side of the generated noise (resized to 28 nearest)")
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="generator learning rate (the paper's 1e-4 is for 500 epochs of MSCOCO)")
    ap.add_argument("--em-rounds", type=int, default=20, help="at most this many EM min-min rounds")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per audit training run")
    ap.add_argument("--defenses", default=",".join(DEFENSES), help="comma list of audit defenses "
                    f"(default {','.join(DEFENSES)})")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30/10 per class, 1 epoch everywhere")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class = 30, 10
        args.clip_epochs = args.t2ue_epochs = args.epochs = 1
        args.em_rounds = 2
    defenses = tuple(args.defenses.split(","))
    start = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    clean, test = data / "clean", data / "test"
    if not clean.exists():
        train_x, train_y = load("train", args.root)
        test_x, test_y = load("test", args.root)
        write_shards(train_x, train_y, balanced(train_y, args.train_per_class), clean, "train", caption=caption)
        write_shards(test_x, test_y, balanced(test_y, args.test_per_class), test, "test", caption=caption)
    shards = sorted(str(p) for p in clean.glob("*.tar"))
    previous = out / "results.json"
    # seconds of each stage, kept from the run that did it (a rerun reuses the stage's output)
    timings: dict[str, float] = json.loads(previous.read_text())["timings"] if previous.exists() else {}

    def timed(name: str, fn, *a, **k):
        t = time.perf_counter()
        result = fn(*a, **k)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {timings[name]} s", flush=True)
        return result

    def clip(name: str, folder: Path, bundle: Path, seed: int) -> str:
        if (bundle / "open_clip_model.safetensors").exists():
            return train_clip(folder, bundle, args.clip_epochs, seed)
        return timed(name, train_clip, folder, bundle, args.clip_epochs, seed)

    surrogate = clip("surrogate CLIP", clean, out / "clip-surrogate", 0)
    surrogate_recall = retrieval(surrogate, test)
    print("surrogate CLIP retrieval (clean test pairs):", surrogate_recall, flush=True)

    artifacts = {name: out / "artifacts" / name for name in ("t2ue-class", "t2ue-sample", "em-class")}
    if not (artifacts["t2ue-class"] / "manifest.json").exists():
        p = timed("fit t2ue", fit_t2ue, str(clean), clip=surrogate, epochs=args.t2ue_epochs, batch_size=128,
                  resolution=args.resolution, lr=args.lr,
                  device="cpu", cache_dir=str(out / "cache-t2ue"), progress=False)
        p.save(artifacts["t2ue-class"], overwrite=True)
    t2ue = load_protection(artifacts["t2ue-class"])
    if not (artifacts["t2ue-sample"] / "manifest.json").exists():
        fit_t2ue(str(clean), clip=surrogate, epochs=0, init=t2ue, mode="sample",
                 device="cpu").save(artifacts["t2ue-sample"], overwrite=True)
    if not (artifacts["em-class"] / "manifest.json").exists():
        p = timed("fit em class-wise", fit_em, str(clean), mode="classwise", surrogate="small-cnn", eps=8 / 255,
                  max_rounds=args.em_rounds, device="cpu", cache_dir=str(out / "cache-em"), progress=False)
        p.save(artifacts["em-class"], overwrite=True)

    options = {
        "t2ue-class": (artifacts["t2ue-class"], ShardOptions(device="cpu", class_names=NAMES)),
        "t2ue-sample": (artifacts["t2ue-sample"], ShardOptions(device="cpu", class_names=NAMES)),
        "t2ue-caption": (artifacts["t2ue-class"], ShardOptions(device="cpu", text_field="txt")),
        "em-class": (artifacts["em-class"], ShardOptions(device="cpu")),
    }
    reports = {}
    for i, name in enumerate(SETS):
        artifact, opts = options[name]
        folder = data / f"protected-{name}"
        if not folder.exists():
            timed(f"protect {name}", protect_shards, load_protection(artifact), shards, str(folder), opts,
                  progress=False)
        report_dir = out / "reports" / name
        if (report_dir / "report.json").exists():
            reports[name] = json.loads((report_dir / "report.json").read_text())
            continue
        config = AuditConfig(epochs=args.epochs, defenses=defenses, device="cpu", baseline=i == 0)
        reports[name] = timed(f"audit {name}", run_audit, str(folder), str(clean), str(test), report_dir, config,
                              progress=False)

    hacker_clean = clip("hacker CLIP clean", clean, out / "clip-hacker-clean", 1)
    hacker_protected = clip("hacker CLIP protected", data / "protected-t2ue-caption", out / "clip-hacker-t2ue-caption",
                            1)
    recall = {"surrogate (clean pairs, seed 0)": surrogate_recall,
              "clean pairs (seed 1)": retrieval(hacker_clean, test),
              "T2UE caption-protected pairs (seed 1)": retrieval(hacker_protected, test)}
    results = {"args": vars(args), "timings": timings, "recall": recall,
               "audit": {name: {"results": r["results"], "imperceptibility": r.get("imperceptibility")}
                         for name, r in reports.items()},
               "seconds": round(time.perf_counter() - start)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(reports, recall, timings, defenses))


def table(reports: dict, recall: dict, timings: dict, defenses: tuple[str, ...]) -> str:
    """The audit table (peak / final %, imperceptibility) and the retrieval table, as markdown."""
    lines = ["| training set | " + " | ".join(defenses) + " | PSNR dB | SSIM | L-inf /255 |",
             "|---" * (len(defenses) + 4) + "|"]

    def acc(report: dict, which: str, defense: str) -> str:
        row = next(r for r in report["results"] if r["training_set"] == which and r["defense"] == defense)
        return f"{100 * row['peak']:.1f} / {100 * row['final']:.1f}"

    lines.append("| clean | " + " | ".join(acc(reports[SETS[0]], "clean", d) for d in defenses) + " | | | |")
    for name, r in reports.items():
        q = r["imperceptibility"]
        lines.append(f"| {name} | " + " | ".join(acc(r, "protected", d) for d in defenses)
                     + f" | {q['psnr']['mean']:.1f} | {q['ssim']['mean']:.3f} | {q['linf']['worst']:.0f} |")
    lines += ["", "| CLIP trained on | I2T R@1 | I2T R@5 | T2I R@1 | T2I R@5 |", "|---|---|---|---|---|"]
    for name, r in recall.items():
        lines.append(f"| {name} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['t2i_r1']:.1f} | {r['t2i_r5']:.1f} |")
    lines += ["", "timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
