"""Is the clean baseline good enough to judge the protection by? Warnings for an audit's report.

A protected-trained accuracy means something only next to a clean-trained model that learned the task:
at small budgets (2000 images, 2 epochs) the clean baseline itself can sit at 21.8 %, and 13.6 % on
the protected set then says little. `audit_warnings` checks every clean-trained row and the run:

- **near chance**: peak below chance + `CHANCE_FRACTION` of the way from chance (1/K, K trained
  classes) to 100 % (32.5 % for 10 classes, 62.5 % for 2);
- **still rising**: the peak grew more than `RISING` (2 points) over the last quarter of the epochs
  (at least the last one), so training stopped before the model converged;
- **one epoch**: no trend to judge convergence by;
- **few images per class**: fewer than `MIN_PER_CLASS` clean training images per class on average;
- **no baseline**: no clean set, or ``--no-baseline``;
- **impure clusters**: a cluster-wise protection (``--protection``) whose clusters have a purity below
  `PURITY` w.r.t. the attacker's labels (`ue_datasets.audit.purity`): its noise then protects little,
  whatever the protected rows say at this budget; the oracle row says what perfect clusters would give;
- **authorized network hindered**: with a UGE protection's authorized network (``--authorized``), its
  peak on the protected set falls more than `AUTHORIZED_GAP` below its peak on the clean set
  (``authorized`` vs ``authorized-clean``, under ``none`` or the first defense): the protection then
  takes from the authorized user too what it should keep for them.

Each warning is one line that says what to change.
"""

from __future__ import annotations

from typing import Any

from .purity import PURITY

#: A clean peak below chance + this fraction of (100 % - chance) is "near chance".
CHANCE_FRACTION = 0.25
#: A clean peak that grew by more than this (accuracy fraction) over the last quarter of training is "still rising".
RISING = 0.02
#: Fewer clean training images per class than this (on average) is "too few".
MIN_PER_CLASS = 100
#: An authorized-trained peak more than this (accuracy fraction) below the authorized-clean one is "hindered".
AUTHORIZED_GAP = 0.1


def more_epochs(epochs: int) -> int:
    """The epochs every warning suggests for a run of ``epochs``: twice as many, and at least 3."""
    return max(3, 2 * epochs)


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def peak_gain(accuracy: list[float]) -> float | None:
    """How much the peak of ``accuracy`` (per epoch, fractions) grew over the last quarter of the
    epochs (at least the last one); None with a single epoch."""
    if len(accuracy) < 2:
        return None
    window = max(1, len(accuracy) // 4)
    return max(accuracy) - max(accuracy[:-window])


def _more_data(config: dict[str, Any]) -> str:
    return f"drop --limit (now {config['limit']})" if config.get("limit") else "use a larger training set"


def _baseline_rows(report: dict[str, Any]) -> list[str]:
    rows = [r for r in report["results"] if r["training_set"] == "clean"]
    config, epochs = report["config"], report["config"]["epochs"]
    classes = report["labels"]["trained_classes"]
    chance = 1 / classes
    floor = chance + CHANCE_FRACTION * (1 - chance)
    out = []
    weak = [r for r in rows if r["peak"] < floor]
    if weak:
        peaks = ", ".join(f"{r['defense']} {_pct(r['peak'])}" for r in weak)
        out.append(
            f"clean baseline near chance ({peaks}; chance {_pct(chance)} for {classes} classes, warned below "
            f"{_pct(floor)}): a model this weak cannot show what the protection hides; train longer "
            f"(--epochs {more_epochs(epochs)}), {_more_data(config)}, or check --lr and --model"
        )
    rising = [(r, peak_gain(r["test_accuracy"])) for r in rows]
    rising = [(r, g) for r, g in rising if g is not None and g > RISING]
    if rising:
        window = max(1, epochs // 4)
        gains = ", ".join(f"{r['defense']} +{100 * g:.1f}" for r, g in rising)
        out.append(
            f"clean baseline not converged: its peak still rose over the last {window} of {epochs} epochs "
            f"({gains} points); the gap to the protected rows is not yet the real one; "
            f"rerun with --epochs {more_epochs(epochs)}"
        )
    if rows and epochs == 1:
        out.append("1 epoch only: whether the clean baseline converged cannot be judged; "
                   f"use --epochs {more_epochs(1)} or more")
    per_class = report["sizes"]["clean"] / classes
    if rows and per_class < MIN_PER_CLASS:
        out.append(
            f"only {per_class:.0f} clean training images per class on average (under {MIN_PER_CLASS}): accuracies "
            f"at this size fall far short of full-data ones; {_more_data(config)}"
        )
    return out


def _cluster_rows(report: dict[str, Any]) -> list[str]:
    """The impure-clusters warning, with the oracle's and the protected peak under ``none`` (or the first
    defense) when both were trained."""
    clusters = report.get("clusters")
    if not clusters or clusters["purity"]["attacker labels"] >= PURITY:
        return []
    purity = clusters["purity"]["attacker labels"]
    peaks = {(r["defense"], r["training_set"]): r["peak"] for r in report["results"]}
    names = [d["name"] for d in report["defenses"]]
    defense = "none" if "none" in names else (names[0] if names else None)
    compared = ""
    if (defense, "oracle") in peaks and (defense, "protected") in peaks:
        compared = (f" (oracle, clusters = the attacker's classes: {_pct(peaks[(defense, 'oracle')])} vs protected "
                    f"{_pct(peaks[(defense, 'protected')])}, peak under {defense})")
    return [
        f"cluster purity w.r.t. the attacker's labels is {purity:.2f}: below about {PURITY}, cluster-wise noise "
        f"protects little{compared}; use clusters that match the classes better (a surrogate encoder that "
        "separates them) or a class-wise protection"
    ]


def _first_defense(report: dict[str, Any]) -> str | None:
    """``none`` when the audit ran it, else its first defense (None without any)."""
    names = [d["name"] for d in report["defenses"]]
    return "none" if "none" in names else (names[0] if names else None)


def _authorized_rows(report: dict[str, Any]) -> list[str]:
    """The authorized-network-hindered warning, under ``none`` (or the first defense) when both authorized
    sets were trained."""
    peaks = {(r["defense"], r["training_set"]): r["peak"] for r in report["results"]}
    defense = _first_defense(report)
    if (defense, "authorized") not in peaks or (defense, "authorized-clean") not in peaks:
        return []
    on_protected, on_clean = peaks[(defense, "authorized")], peaks[(defense, "authorized-clean")]
    if on_protected >= on_clean - AUTHORIZED_GAP:
        return []
    return [
        f"the authorized network learns the protected set much worse than the clean one ({_pct(on_protected)} vs "
        f"{_pct(on_clean)}, peak under {defense}): the protection hinders the authorized user too; fit the UGE "
        "noise longer (--rounds) or with more weight on gradient matching (--lambda-gm), or check that the audit "
        "trains as the fit did (--lr, --batch-size, --epochs)"
    ]


def audit_warnings(report: dict[str, Any]) -> list[str]:
    """Warnings about the audit in ``report`` (as `run_audit` builds it: ``results``, ``config``,
    ``labels``, ``sizes``, ``clusters``), each one line ending in what to change; empty when the baseline
    is sound, the clusters (if any) are pure and the authorized network (if any) learns the protected set."""
    return _baseline_warnings(report) + _cluster_rows(report) + _authorized_rows(report)


def _baseline_warnings(report: dict[str, Any]) -> list[str]:
    if not report["sizes"]["clean"]:
        return [("no --clean set: there is no clean-trained baseline, so the protected accuracies cannot be "
                 "judged (a low number may just be a model that learned nothing); pass the clean training set as --clean")]
    if not any(r["training_set"] == "clean" for r in report["results"]):
        return [("--no-baseline: there is no clean-trained baseline, so the protected accuracies cannot be judged "
                 "(a low number may just be a model that learned nothing); drop --no-baseline, or compare with "
                 "the baseline of an earlier report with the same data and settings")]
    return _baseline_rows(report)
