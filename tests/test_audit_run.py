"""End-to-end audit: sources in, report out; a class-wise shortcut is caught, the baseline learns."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import encode, gray_shard, write_shard
from ue_datasets import UEDatasetsError
from ue_datasets.audit import AuditConfig, run_audit
from ue_datasets.audit.data import align, load_labelled
from ue_datasets.audit.relabel import merge_map, parse_relabel
from ue_datasets.cli import main

SIZE, CLASSES = 12, 4


def _task(seed: int, n: int, shortcut: bool = False):
    """Learnable images: class template + noise; with ``shortcut``, plus a strong class-wise stripe pattern."""
    rng = np.random.default_rng(1234)
    templates = rng.integers(0, 256, (CLASSES, SIZE, SIZE)).astype(np.float64)
    stripes = np.zeros((CLASSES, SIZE, SIZE))
    for c in range(CLASSES):
        stripes[c, :, c::CLASSES] = 255.0
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = []
    for y in labels:
        x = 0.5 * templates[y] + rng.normal(0, 60, (SIZE, SIZE))
        if shortcut:  # the shortcut dominates: images of another class's content carry this label's stripes
            x = 0.3 * templates[rng.integers(0, CLASSES)] + 0.7 * stripes[y]
        images.append(np.clip(x, 0, 255).astype(np.uint8))
    return images, labels


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    clean_x, clean_y = _task(0, 400)
    prot_x, _ = _task(0, 400, shortcut=True)
    test_x, test_y = _task(1, 200)
    return {
        "clean": gray_shard(root / "clean", clean_x, clean_y),
        "protected": gray_shard(root / "protected", prot_x, clean_y),
        "test": gray_shard(root / "test", test_x, test_y, prefix="t"),
        "root": root,
    }


@pytest.mark.slow
def test_shortcut_drives_clean_accuracy_down_while_baseline_learns(sources, tmp_path):
    config = AuditConfig(epochs=4, batch_size=32, lr=0.05, defenses=("none", "median:3"), device="cpu")
    report = run_audit(sources["protected"], sources["clean"], sources["test"], tmp_path / "r", config, progress=False)
    by = {(r["defense"], r["training_set"]): r for r in report["results"]}
    clean, protected = by[("none", "clean")], by[("none", "protected")]
    assert clean["peak"] > 0.8
    assert protected["final"] < clean["final"] - 0.3
    assert len(clean["test_accuracy"]) == 4 and clean["peak"] == max(clean["test_accuracy"])
    assert set(by) == {("none", "clean"), ("none", "protected"), ("median:3", "clean"), ("median:3", "protected")}
    assert report["imperceptibility"]["n"] == 400 and report["imperceptibility"]["linf"]["worst"] > 50


def test_report_files_are_written_and_parse(sources, tmp_path):
    config = AuditConfig(epochs=1, batch_size=64, defenses=("none", "jpeg:10"), device="cpu")
    run_audit(sources["protected"], sources["clean"], sources["test"], tmp_path / "r", config, progress=False)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["defenses"] == ["none", "jpeg:10"] and len(report["results"]) == 4
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| jpeg:10 |" in md and "psnr" in md
    for png in ("accuracy.png", "grid.png"):
        assert Image.open(tmp_path / "r" / png).size[0] > 200


def test_relabel_merges_classes_for_the_attacker(sources, tmp_path):
    config = AuditConfig(epochs=1, batch_size=64, relabel="merge:2", device="cpu", baseline=False)
    report = run_audit(sources["protected"], sources["clean"], sources["test"], tmp_path / "r", config, progress=False)
    assert report["labels"]["trained_classes"] == 2 and report["labels"]["map"] == [0, 0, 1, 1]
    assert [r["training_set"] for r in report["results"]] == ["protected"]


def test_parse_relabel_forms(tmp_path):
    assert merge_map(10, 2).tolist() == [0] * 5 + [1] * 5
    assert parse_relabel("0:1,1:0,2:1", 3).tolist() == [0, 1, 0]
    (tmp_path / "m.json").write_text(json.dumps({"0": 5, "1": 5, "2": 7}))
    assert parse_relabel(str(tmp_path / "m.json"), 3).tolist() == [0, 0, 1]
    assert parse_relabel(None, 3) is None
    with pytest.raises(UEDatasetsError, match="does not map"):
        parse_relabel("0:1", 3)
    with pytest.raises(UEDatasetsError):
        parse_relabel("merge:9", 3)


def test_sources_of_every_kind_load_to_the_same_tensors(sources, tmp_path):
    shards = load_labelled(sources["clean"])
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(x[0].numpy(), "L") for x in shards.images], "label": shards.labels.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for src in (str(tmp_path / "hf"), str(tmp_path / "p.parquet")):
        other = load_labelled(src)
        assert torch.equal(other.images, shards.images) and torch.equal(other.labels, shards.labels)
    a, b = align(shards, load_labelled(sources["protected"]))
    assert a.shape == b.shape == shards.images.shape


def test_mixed_sizes_need_image_size(tmp_path):
    samples = [{"__key__": f"k{i}", "png": encode(Image.new("L", (8 + i, 8))), "cls": b"0"} for i in range(2)]
    url = write_shard(tmp_path / "m.tar", samples)
    with pytest.raises(UEDatasetsError, match="--image-size"):
        load_labelled(url)
    assert load_labelled(url, image_size=6).images.shape == (2, 1, 6, 6)


def test_cli_audit_prints_the_table(sources, tmp_path, capsys):
    assert main(["audit", "--protected", sources["protected"], "--clean", sources["clean"], "--test", sources["test"],
                 "--epochs", "1", "--defense", "none,bdr", "--device", "cpu", "-o", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| bdr:2 |" in out and (tmp_path / "r" / "report.md").exists()
    assert main(["audit", "--protected", sources["protected"], "--test", sources["test"], "--defense", "nope",
                 "-o", str(tmp_path / "r2")]) == 2


def test_audit_without_clean_set_reports_without_imperceptibility(sources, tmp_path):
    config = AuditConfig(epochs=1, batch_size=64, device="cpu")
    report = run_audit(sources["protected"], None, sources["test"], tmp_path / "r", config, progress=False)
    assert report["imperceptibility"] is None and [r["training_set"] for r in report["results"]] == ["protected"]
    assert "n/a: no --clean" in (tmp_path / "r" / "report.md").read_text()
