"""The audit at small budgets: baseline warnings, the cost estimate, the accuracy plot, printed paths."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import encode, write_shard
from PIL import Image

from ue_datasets.audit import AuditConfig, run_audit
from ue_datasets.audit.checks import audit_warnings, peak_gain
from ue_datasets.audit.cost import Forecast, classifier_cost, cost_table, probe_cost
from ue_datasets.audit.defenses import parse_defense
from ue_datasets.audit.report import accuracy_figure
from ue_datasets.audit.train import SSL_EPOCHS


def _report(clean_curves: dict[str, list[float]] | None, classes: int = 10, n_clean: int = 2000,
            limit: int | None = None, protected: float = 0.136) -> dict:
    """A report as `run_audit` builds it, with clean-trained curves per defense (None: no baseline)."""
    curves = clean_curves or {"none": [protected] * 2}
    epochs = len(next(iter(curves.values())))
    results = []
    for defense, acc in curves.items():
        if clean_curves is not None:
            results.append({"defense": defense, "training_set": "clean", "test_accuracy": acc, "peak": max(acc)})
        flat = [protected] * epochs
        results.append({"defense": defense, "training_set": "protected", "test_accuracy": flat, "peak": protected})
    return {"results": results, "config": {"epochs": epochs, "limit": limit}, "labels": {"trained_classes": classes},
            "sizes": {"clean": n_clean}, "defenses": [{"name": d} for d in curves]}


def test_the_issue_baseline_of_21_8_percent_after_2_epochs_is_warned():
    warnings = audit_warnings(_report({"none": [0.15, 0.218]}, limit=2000))
    near, rising = warnings
    assert near.startswith("clean baseline near chance (none 21.8 %; chance 10.0 %")
    assert "--epochs 4" in near and "drop --limit (now 2000)" in near
    assert rising.startswith("clean baseline not converged") and "+6.8 points" in rising and "--epochs 4" in rising


def test_a_converged_baseline_gives_no_warning():
    assert audit_warnings(_report({"none": [0.6, 0.8, 0.86, 0.875, 0.88, 0.884, 0.886, 0.886]})) == []


def test_a_peak_still_rising_over_the_last_quarter_of_training_is_warned():
    curve = [0.5, 0.7, 0.8, 0.84, 0.86, 0.87, 0.875, 0.9]  # +3 points over the last 2 of 8 epochs
    assert peak_gain(curve) == pytest.approx(0.03)
    assert [w.split(":")[0] for w in audit_warnings(_report({"none": curve}))] == ["clean baseline not converged"]
    settled = [0.5, 0.7, 0.8, 0.84, 0.86, 0.87, 0.88, 0.885]  # +1.5 points: within the noise
    assert audit_warnings(_report({"none": settled})) == []
    assert peak_gain([0.5]) is None


def test_chance_follows_the_trained_classes():
    two_classes = _report({"none": [0.6, 0.6, 0.6, 0.6]}, classes=2)  # 60 % < 50 % + 12.5 %
    assert audit_warnings(two_classes)[0].startswith("clean baseline near chance (none 60.0 %; chance 50.0 %")
    assert audit_warnings(_report({"none": [0.6, 0.6, 0.6, 0.6]}, classes=10)) == []


def test_one_epoch_and_few_images_per_class_are_warned_with_what_to_change():
    warnings = audit_warnings(_report({"none": [0.8]}, n_clean=500, limit=500))
    assert any(w.startswith("1 epoch only") and "--epochs 3" in w for w in warnings)
    assert any(w.startswith("only 50 clean training images per class") and "drop --limit (now 500)" in w
               for w in warnings)


def test_without_a_baseline_the_protected_numbers_are_said_to_be_unjudgeable():
    (no_baseline,) = audit_warnings(_report(None))
    assert no_baseline.startswith("--no-baseline") and "cannot be judged" in no_baseline
    (no_clean,) = audit_warnings(_report(None, n_clean=0))
    assert no_clean.startswith("no --clean set") and "cannot be judged" in no_clean


def test_adversarial_training_costs_steps_plus_one_plain_epochs():
    plain = classifier_cost(parse_defense("jpeg:10"), "clean", 10, 3000, 0)
    at = classifier_cost(parse_defense("at:8"), "clean", 10, 3000, 0)
    assert plain.units == 10 and at.units == 110 and at.setting == "at:8 / clean"
    with_eval = classifier_cost(parse_defense("none"), "clean", 10, 3000, 900)
    assert with_eval.per_epoch == pytest.approx(1.1)  # + a forward pass over the test set, a third of one
    probe = probe_cost("clean", 10, 3000, 0)
    assert probe.units == pytest.approx(SSL_EPOCHS * 2.5 + 1 / 3)


def test_the_cost_table_gives_each_settings_share():
    table = cost_table([classifier_cost(parse_defense(d), "protected", 10, 1000, 0)
                        for d in ("none", "augment", "at:8")])
    lines = table.splitlines()
    assert "an estimate" in lines[0] and lines[1].split() == ["setting", "epochs", "share"]
    assert lines[2].split() == ["none", "/", "protected", "10.0", "8", "%"]
    assert lines[4].split() == ["at:8", "/", "protected", "110.0", "85", "%"]
    assert lines[5].split() == ["total", "130.0"]


def test_the_first_epoch_time_becomes_one_estimate_for_the_whole_audit():
    costs = [classifier_cost(parse_defense(d), "clean", 5, 1000, 0) for d in ("none", "at:8")]
    stream = io.StringIO()
    forecast = Forecast(costs, stream)
    forecast(1, 2.0)
    forecast(2, 50.0)
    assert forecast.seconds == pytest.approx(2.0 * 60)  # 2 s per plain epoch, 5 + 55 plain epochs
    assert stream.getvalue().count("\n") == 1
    assert "about 2 min 00 s for the whole audit (an estimate" in stream.getvalue()


def test_accuracy_plot_has_integer_epoch_ticks_and_no_curve_hidden_under_another():
    report = _report({"none": [0.3, 0.5, 0.7], "blur:0.1": [0.3, 0.5, 0.7]})
    fig = accuracy_figure(report)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [1, 2, 3]
    lines = ax.get_lines()
    styles = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == 4
    assert [line.get_linestyle() for line in lines] == ["--", "-", "--", "-"]  # clean dashed, protected solid
    none_clean, blur_clean = lines[0], lines[2]
    assert list(none_clean.get_ydata()) == list(blur_clean.get_ydata())
    assert min(abs(a - b) for a, b in zip(none_clean.get_xdata(), blur_clean.get_xdata())) >= 0.2  # side by side
    assert [line.get_linewidth() for line in lines] == sorted((line.get_linewidth() for line in lines), reverse=True)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside the axes


@pytest.fixture
def tiny_sources(tmp_path):
    """40 random 8x8 grey images of 4 classes as shards: clean, protected (inverted) and test."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 4, 40)

    def shards(name, xs):
        (tmp_path / name).mkdir()
        samples = [{"__key__": f"k{i:03d}", "png": encode(Image.fromarray(x, "L")), "cls": str(int(y)).encode()}
                   for i, (x, y) in enumerate(zip(xs, labels))]
        return write_shard(tmp_path / name / "part-000.tar", samples)

    return shards("clean", images), shards("protected", 255 - images), shards("test", images[:20])


def test_the_audit_warns_in_report_json_markdown_and_stderr(tiny_sources, tmp_path):
    clean, protected, test = tiny_sources
    stream = io.StringIO()
    config = AuditConfig(epochs=1, batch_size=16, device="cpu", limit=40)
    report = run_audit(protected, clean, test, f"{tmp_path}/out/", config, progress=False, stream=stream)
    printed = stream.getvalue()
    assert report["warnings"] and any("drop --limit (now 40)" in w for w in report["warnings"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"] == report["warnings"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index(report["warnings"][0]) < md.index("| defense |")  # at the top, above the table
    assert all(f"ue-datasets: warning: {w}" in printed for w in report["warnings"])
    assert printed.index("cost estimate") < printed.index("the first epoch took") < printed.index("warning:")
    assert report["cost"]["estimated_seconds"] > 0
    assert [s["setting"] for s in report["cost"]["settings"]] == ["none / clean", "none / protected"]
    assert report["files"]["report.md"] == f"{tmp_path}/out/report.md"  # no doubled slash
    assert set(report["files"]) == {"report.json", "report.md", "accuracy.png", "grid.png"}
