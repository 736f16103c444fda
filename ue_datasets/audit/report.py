"""Audit reports: ``report.json`` (every figure), ``report.md`` (the table) and an accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _finite(obj: Any) -> Any:
    """JSON has no infinity: write ``inf`` (PSNR of identical images) as the string ``"inf"``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v: Any, digits: int = 2) -> str:
    return str(v) if isinstance(v, str) else ("inf" if v == math.inf else f"{v:.{digits}f}")


def markdown_table(report: dict[str, Any]) -> str:
    """The results table: peak and final clean test accuracy per defense, clean- vs protected-trained."""
    rows = {}
    for r in report["results"]:
        rows.setdefault(r["defense"], {})[r["training_set"]] = r
    lines = [
        "| defense | clean-trained peak | clean-trained final | protected-trained peak | protected-trained final |",
        "|---|---|---|---|---|",
    ]
    for defense, by_set in rows.items():
        c, p = by_set.get("clean"), by_set.get("protected")
        lines.append(
            f"| {defense} | {_pct(c and c['peak'])} | {_pct(c and c['final'])} | "
            f"**{_pct(p and p['peak'])}** | {_pct(p and p['final'])} |"
        )
    return "\n".join(lines)


def imperceptibility_table(metrics: dict[str, Any]) -> str:
    """L-inf, L2, PSNR and SSIM, mean and worst case."""
    lines = ["| metric | mean | worst |", "|---|---|---|"]
    for name, unit in (("linf", " (/255)"), ("l2", ""), ("psnr", " (dB)"), ("ssim", "")):
        m = metrics[name]
        lines.append(f"| {name}{unit} | {_num(m['mean'], 4)} | {_num(m['worst'], 4)} |")
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    cfg = report["config"]
    parts = [
        "# ue-datasets audit",
        "",
        f"- protected: `{report['inputs']['protected']}` ({report['sizes']['protected']} images)",
        f"- clean: `{report['inputs']['clean']}` ({report['sizes']['clean']} images)",
        f"- test: `{report['inputs']['test']}` ({report['sizes']['test']} images, clean)",
        f"- model: `{cfg['model']}`, {cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"seed {cfg['seed']}, device {cfg['device']}",
        f"- labels: {report['labels']['description']}",
        f"- protection: {report.get('protection') or 'unknown (no stats found next to the protected data)'}",
        "",
        "Clean test accuracy (%) of a model trained on each training set; lower on the protected set is "
        "better protection. Peak = best epoch (early stopping is an attack), final = last epoch.",
        "",
        markdown_table(report),
        "",
        "## Imperceptibility (clean vs protected, same keys)",
        "",
        imperceptibility_table(report["imperceptibility"]) if report["imperceptibility"] else "n/a: no --clean set given",
        "",
        "![accuracy per epoch](accuracy.png)",
        "",
        "![clean | protected | amplified difference](grid.png)" if report["imperceptibility"] else "",
        "",
        "Defenses: " + "; ".join(f"`{d['name']}`: {d['description']}" for d in report["defenses"]),
        "",
    ]
    path.write_text("\n".join(parts))
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_finite(report), indent=2) + "\n")
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Clean test accuracy per epoch, one colour per defense; solid clean-trained, dashed protected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = plt.get_cmap("tab10")
    defenses = list(dict.fromkeys(r["defense"] for r in report["results"]))
    for r in report["results"]:
        colour = colours(defenses.index(r["defense"]) % 10)
        style = "-" if r["training_set"] == "clean" else "--"
        epochs = range(1, len(r["test_accuracy"]) + 1)
        ax.plot(epochs, [100 * a for a in r["test_accuracy"]], style, color=colour, marker="o", markersize=3,
                label=f"{r['defense']} / {r['training_set']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("trained on clean (solid) vs protected (dashed) data")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
