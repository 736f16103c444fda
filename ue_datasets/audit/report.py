"""Audit reports: ``report.json`` (every figure), ``report.md`` (the table) and an accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .purity import PURITY

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


#: Training sets with columns of their own in `markdown_table` when trained, after clean and protected:
#: the oracle set (the cluster-wise protection's bound, `ue_datasets.audit.purity`) and a UGE protection's
#: authorized network on the protected and the clean set (`ue_datasets.audit.run.AUTHORIZED_SETS`).
OPTIONAL_SETS = ("oracle", "authorized", "authorized-clean")


def markdown_table(report: dict[str, Any]) -> str:
    """The results table: peak and final clean test accuracy per defense, clean- vs protected-trained,
    then oracle-trained and authorized-trained (`OPTIONAL_SETS`) when trained."""
    rows = {}
    for r in report["results"]:
        rows.setdefault(r["defense"], {})[r["training_set"]] = r
    trained = {r["training_set"] for r in report["results"]}
    extra = [name for name in OPTIONAL_SETS if name in trained]
    head = "| defense | clean-trained peak | clean-trained final | protected-trained peak | protected-trained final |"
    lines = [head + "".join(f" {name}-trained peak | {name}-trained final |" for name in extra),
             "|---|---|---|---|---|" + "---|---|" * len(extra)]
    for defense, by_set in rows.items():
        c, p = by_set.get("clean"), by_set.get("protected")
        cells = "".join(f" {_pct(o and o['peak'])} | {_pct(o and o['final'])} |"
                        for o in (by_set.get(name) for name in extra))
        lines.append(
            f"| {defense} | {_pct(c and c['peak'])} | {_pct(c and c['final'])} | "
            f"**{_pct(p and p['peak'])}** | {_pct(p and p['final'])} |" + cells
        )
    return "\n".join(lines)


def clusters_paragraph(clusters: dict[str, Any] | None) -> list[str]:
    """The "Clusters" section of ``report.md`` (purity and how to read the oracle rows); none without one."""
    if not clusters:
        return []
    purity = clusters["purity"]
    oracle = ("The oracle columns train on the clean set with the same perturbations given by the attacker's labels "
              f"(modulo {clusters['num_clusters']}) instead of the protector's clusters: the most this perturbation "
              "could do with perfect clusters." if clusters["oracle"] else "No oracle set was trained (--no-oracle).")
    return [
        "## Clusters",
        "",
        f"The protection perturbs by cluster: {clusters['num_clusters']} clusters (sizes "
        f"{', '.join(map(str, clusters['sizes']))} on the clean training set). Purity of the protector's clusters "
        f"(share of samples whose cluster's majority label is theirs): **{purity['true labels']:.2f}** w.r.t. the "
        f"true labels, **{purity['attacker labels']:.2f}** w.r.t. the attacker's labels. Below about {PURITY} purity, "
        f"additive cluster noise does little. {oracle}",
        "",
    ]


def authorized_paragraph(authorized: dict[str, Any] | None) -> list[str]:
    """The "Authorized network" section of ``report.md`` (how to read the authorized columns); none
    without one."""
    if not authorized:
        return []
    return [
        "## Authorized network",
        "",
        f"The protection is ungeneralizable (UGE, id {authorized['id']}): it should stay learnable for its authorized "
        f"network, `{authorized['arch']}` ({authorized['num_classes']} classes) rebuilt with its secret "
        "initialisation from the artifact, and be unlearnable for every other model. The authorized columns train "
        "that network (a fresh copy per run) on the protected set and, as its reference, on the clean set "
        "(authorized-clean): authorized near authorized-clean means the authorized user loses little; protected "
        "far below both means others do.",
        "",
    ]


def imperceptibility_table(metrics: dict[str, Any]) -> str:
    """L-inf, L2, PSNR and SSIM, mean and worst case."""
    lines = ["| metric | mean | worst |", "|---|---|---|"]
    for name, unit in (("linf", " (/255)"), ("l2", ""), ("psnr", " (dB)"), ("ssim", "")):
        m = metrics[name]
        lines.append(f"| {name}{unit} | {_num(m['mean'], 4)} | {_num(m['worst'], 4)} |")
    return "\n".join(lines)


def warnings_block(warnings: list[str]) -> list[str]:
    """The report's warnings as Markdown lines for the top of ``report.md``; none when there are none."""
    if not warnings:
        return []
    return ["**Warning: the numbers below may mislead.**", "", *(f"- {w}" for w in warnings), ""]


def cost_table_md(cost: dict[str, Any]) -> str:
    """The cost estimated before training next to the measured seconds, per setting."""
    total = sum(s["seconds"] for s in cost["settings"]) or 1.0
    lines = ["| setting | estimated plain epochs | estimated share | measured s | measured share |",
             "|---|---|---|---|---|"]
    for s in cost["settings"]:
        lines.append(f"| {s['setting']} | {s['estimated_units']:.1f} | {100 * s['estimated_share']:.0f} % | "
                     f"{s['seconds']:.1f} | {100 * s['seconds'] / total:.0f} % |")
    return "\n".join(lines)


def write_markdown(report: dict[str, Any], path: Path) -> Path:
    cfg = report["config"]
    parts = [
        "# ue-datasets audit",
        "",
        *warnings_block(report["warnings"]),
        f"- protected: `{report['inputs']['protected']}` ({report['sizes']['protected']} images)",
        f"- clean: `{report['inputs']['clean']}` ({report['sizes']['clean']} images)",
        *([f"- oracle: the clean set with the protection's perturbations by the attacker's labels "
           f"({report['sizes']['oracle']} images; see Clusters)"] if "oracle" in report["sizes"] else []),
        *([f"- authorized: the UGE protection's authorized network `{report['authorized']['arch']}` with its secret "
           "initialisation, trained on the protected set (and the clean set: authorized-clean); see Authorized network"]
          if report.get("authorized") else []),
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
        *clusters_paragraph(report.get("clusters")),
        *authorized_paragraph(report.get("authorized")),
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
        "## Cost",
        "",
        f"Estimated before training in plain epochs ({report['cost']['unit']}), next to the measured time.",
        "",
        cost_table_md(report["cost"]),
        "",
    ]
    path.write_text("\n".join(parts))
    return path


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_finite(report), indent=2) + "\n")
    return path


#: One marker per defense, cycled; curves on clean images (clean, oracle, authorized-clean) draw them hollow.
_MARKERS = "osD^vPX*<>"
#: Total sideways spread (in epochs) of the defenses' points in `accuracy_figure`.
_DODGE = 0.3
#: Line style and filled markers of each training set's curves in `accuracy_figure` (others: solid, filled).
_STYLES = {"clean": ("--", False), "oracle": (":", False), "authorized": ("-.", True),
           "authorized-clean": ((0, (6, 2, 1, 2, 1, 2)), False)}


def accuracy_figure(report: dict[str, Any]) -> Figure:
    """Clean test accuracy per epoch (a matplotlib ``Figure``): one colour and marker per defense,
    protected-trained solid with filled markers, clean-trained dashed with hollow ones, oracle-trained
    (`ue_datasets.audit.purity`) dotted with hollow ones, and a UGE protection's authorized network
    dash-dotted, filled on the protected set (authorized), hollow on the clean set (authorized-clean)
    (`_STYLES`). So that equal
    curves (``blur:0.1`` often matches ``none``) cannot hide each other, each defense's points are
    shifted sideways by up to `_DODGE` / 2 epoch and curves are drawn thickest first. Epochs are integer
    ticks; the legend sits outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    defenses = list(dict.fromkeys(r["defense"] for r in report["results"]))
    colours = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20")
    n = len(report["results"])
    for i, r in enumerate(report["results"]):
        k = defenses.index(r["defense"])
        colour = colours(k % colours.N)
        style, filled = _STYLES.get(r["training_set"], ("-", True))
        shrink = i / max(1, n - 1)  # 0 for the first curve drawn, 1 for the last
        shift = _DODGE * (k / (len(defenses) - 1) - 0.5) if len(defenses) > 1 else 0.0
        epochs = [e + shift for e in range(1, len(r["test_accuracy"]) + 1)]
        ax.plot(epochs, [100 * a for a in r["test_accuracy"]], linestyle=style, color=colour,
                linewidth=3.0 - 1.8 * shrink, marker=_MARKERS[k % len(_MARKERS)], markersize=10 - 5 * shrink,
                markerfacecolor=colour if filled else "white", markeredgewidth=1.2,
                label=f"{r['defense']} / {r['training_set']}")
    last = max((len(r["test_accuracy"]) for r in report["results"]), default=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(1 - _DODGE, last + _DODGE)
    ax.set_xlabel("epoch" if len(defenses) == 1 else "epoch (each defense shifted slightly sideways)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    trained = {r["training_set"] for r in report["results"]}
    extra = [text for name, text in (("oracle", "oracle (dotted, hollow)"),
                                     ("authorized",
                                      "authorized (dash-dot, filled, on protected; dash-dot-dot, hollow, on clean)"))
             if name in trained]
    ax.set_title("trained on protected (solid, filled) vs clean (dashed, hollow)"
                 + "".join(f" and {text}" for text in extra) + " data")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Save `accuracy_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(report)
    fig.savefig(path)
    plt.close(fig)
    return path
