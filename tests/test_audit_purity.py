"""The cluster purity diagnostic and the oracle bound of cluster-wise protections in the audit."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import gray_shard, template_task
from PIL import Image

from ue_datasets import UEDatasetsError
from ue_datasets.apply.core import protect_batch
from ue_datasets.audit import AuditConfig, run_audit
from ue_datasets.audit import run as audit_run
from ue_datasets.audit.checks import audit_warnings
from ue_datasets.audit.data import load_labelled
from ue_datasets.audit.purity import cluster_purity, clusters_of, is_cluster_wise, oracle_protection
from ue_datasets.audit.relabel import merge_map
from ue_datasets.cli import main

SIZE, CLASSES, K = 8, 4, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Clean, test and clusters-protected shards, the clusters artifact and a CUDA (convolution) one."""
    from ue_datasets.encoders import callable_encoder
    from ue_datasets.fit.clusters import fit_clusters
    from ue_datasets.fit.convolution import fit_convolution

    root = tmp_path_factory.mktemp("purity")
    clean = gray_shard(root / "clean", *template_task(0, 48), "k")
    test = gray_shard(root / "test", *template_task(1, 24), "t")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    protection = fit_clusters(clean, callable_encoder(net, size=SIZE), clusters=K, mode="fast", epochs=1,
                              batch_size=16, resolution=SIZE, device="cpu", progress=False)
    protection.save(root / "uc")
    fit_convolution(CLASSES, key=7).save(root / "cuda")
    assert main(["protect", "--protection", str(root / "uc"), "--input", clean, "--output", str(root / "protected"),
                 "--no-progress"]) == 0
    return {"root": root, "clean": clean, "test": test, "protected": str(root / "protected"),
            "uc": str(root / "uc"), "cuda": str(root / "cuda"), "protection": protection}


def test_purity_is_the_share_of_samples_in_their_clusters_majority_label():
    assert cluster_purity(torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 1, 2])) == pytest.approx(5 / 6)
    assert cluster_purity(torch.tensor([2, 2, 0, 1]), torch.tensor([1, 1, 3, 0])) == 1.0
    assert cluster_purity(torch.zeros(5, dtype=torch.int64), torch.tensor([1, 1, 1, 0, 2])) == pytest.approx(3 / 5)
    with pytest.raises(UEDatasetsError, match="3 clusters for 2 labels"):
        cluster_purity(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(UEDatasetsError):
        cluster_purity(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


def test_oracle_applies_perturbation_label_mod_k_with_the_same_kernel(data):
    p = data["protection"]
    oracle = oracle_protection(p)
    assert is_cluster_wise(p) and oracle.method == "clusters" and oracle.id != p.id
    assert oracle.params["lookup"] == "class" and oracle.params["num_classes"] == K
    assert oracle.tensors["deltas"] is p.tensors["deltas"] and "lookup" not in p.params  # shared, original untouched
    x = torch.randint(0, 256, (6, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 3, 5, 7])  # 5 and 7 wrap to 1 and 3
    got = protect_batch(oracle, x, labels=y % K)
    delta = p.tensors["deltas"][y % K]  # (6, 1, SIZE, SIZE): no resize at the fitted resolution
    expected = torch.floor((x / 255 + delta).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    assert torch.equal(got, expected)
    assert torch.equal(got[4:], protect_batch(oracle, x[4:], labels=torch.tensor([1, 3])))
    # on the fitted images, labels = their clusters give exactly what the real protection gives
    clean = load_labelled(data["clean"])
    clusters = clusters_of(p, clean.images, clean.keys, batch_size=10)
    assert torch.equal(clusters, p.tensors["assignments"])
    assert torch.equal(protect_batch(oracle, clean.images, labels=clusters), protect_batch(p, clean.images,
                                                                                          keys=clean.keys))


def test_oracle_refuses_a_protection_that_is_not_cluster_wise(data):
    from ue_datasets.artifact import load_protection

    cuda = load_protection(data["cuda"])
    assert not is_cluster_wise(cuda)
    with pytest.raises(UEDatasetsError, match="cluster-wise"):
        oracle_protection(cuda)


def test_audit_reports_purity_and_trains_oracle_sets_on_the_attackers_labels(data, tmp_path, monkeypatch):
    calls = []
    real = audit_run.train_classifier

    def recording(model, x, y, *args, **kwargs):
        calls.append((x.clone(), y.clone()))
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(audit_run, "train_classifier", recording)
    config = AuditConfig(epochs=1, batch_size=16, defenses=("none", "bdr"), relabel="merge:2", device="cpu",
                         protection=data["uc"])
    report = run_audit(data["protected"], data["clean"], data["test"], tmp_path / "r", config, progress=False)
    assert [(r["defense"], r["training_set"]) for r in report["results"]] == [
        (d, s) for d in ("none", "bdr:2") for s in ("clean", "protected", "oracle")]
    clean, merge = load_labelled(data["clean"]), merge_map(CLASSES, 2)
    clusters = data["protection"].tensors["assignments"]
    section = report["clusters"]
    assert section["num_clusters"] == K and section["oracle"] is True and sum(section["sizes"]) == 48
    assert section["sizes"] == torch.bincount(clusters, minlength=K).tolist()
    assert section["purity"]["true labels"] == pytest.approx(cluster_purity(clusters, clean.labels), abs=1e-4)
    attacker = cluster_purity(clusters, merge[clean.labels])
    assert section["purity"]["attacker labels"] == pytest.approx(attacker, abs=1e-4)
    # the oracle set (third run, defense none): clean images with perturbation (merged label % K), merged labels
    x, y = calls[2]
    assert torch.equal(y, merge[clean.labels])
    assert torch.equal(x, protect_batch(oracle_protection(data["protection"]), clean.images, labels=y % K))
    settings = [s["setting"] for s in report["cost"]["settings"]]
    assert settings[:3] == ["none / clean", "none / protected", "none / oracle"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Clusters" in md and "oracle-trained peak" in md and "w.r.t. the attacker's labels" in md
    assert json.loads((tmp_path / "r" / "report.json").read_text())["clusters"] == section
    assert Image.open(tmp_path / "r" / "accuracy.png").size[0] > 200


def test_a_non_cluster_protection_gives_no_cluster_section_and_no_oracle(data, tmp_path):
    assert main(["protect", "--protection", data["cuda"], "--input", data["clean"], "--output",
                 str(tmp_path / "cuda-protected"), "--no-progress"]) == 0
    config = AuditConfig(epochs=1, batch_size=16, device="cpu", protection=data["cuda"])
    stream = io.StringIO()
    report = run_audit(str(tmp_path / "cuda-protected"), data["clean"], data["test"], tmp_path / "r", config,
                       progress=False, stream=stream)
    assert "has no clusters, so there is no purity diagnostic" in stream.getvalue()
    assert report["clusters"] is None
    assert [r["training_set"] for r in report["results"]] == ["clean", "protected"]
    assert "## Clusters" not in (tmp_path / "r" / "report.md").read_text()


def test_a_protection_other_than_the_one_the_protected_set_names_is_refused(data, tmp_path):
    config = AuditConfig(epochs=1, device="cpu", protection=data["cuda"])
    with pytest.raises(UEDatasetsError, match="is not the id"):
        run_audit(data["protected"], data["clean"], data["test"], tmp_path / "r", config, progress=False)


def test_purity_and_oracle_refuse_resized_clean_images(data, tmp_path):
    config = AuditConfig(epochs=1, device="cpu", protection=data["uc"], image_size=8)
    with pytest.raises(UEDatasetsError, match="--image-size"):
        run_audit(data["protected"], data["clean"], data["test"], tmp_path / "r", config, progress=False)


def test_a_cluster_wise_protection_needs_the_clean_set(data, tmp_path):
    config = AuditConfig(epochs=1, device="cpu", protection=data["uc"])
    with pytest.raises(UEDatasetsError, match="--clean"):
        run_audit(data["protected"], None, data["test"], tmp_path / "r", config, progress=False)


def test_cli_audit_takes_protection_and_no_oracle(data, tmp_path, capsys):
    assert main(["audit", "--protected", data["protected"], "--clean", data["clean"], "--test", data["test"],
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--protection", data["uc"], "--no-oracle",
                 "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| none |" in out and "oracle-trained" not in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["clusters"]["oracle"] is False and report["config"]["protection"] == data["uc"]
    assert report["clusters"]["purity"]["attacker labels"] == report["clusters"]["purity"]["true labels"]
    assert [r["training_set"] for r in report["results"]] == ["clean", "protected"]


def _report(purity: float, oracle: float | None = 0.2, protected: float = 0.85) -> dict:
    """A report with a converged clean baseline and a cluster section of the given attacker-label purity."""
    curve = [0.6, 0.8, 0.86, 0.88, 0.885]
    results = [{"defense": "none", "training_set": "clean", "test_accuracy": curve, "peak": max(curve)},
               {"defense": "none", "training_set": "protected", "test_accuracy": [protected] * 5, "peak": protected}]
    if oracle is not None:
        results.append({"defense": "none", "training_set": "oracle", "test_accuracy": [oracle] * 5, "peak": oracle})
    return {"results": results, "config": {"epochs": 5, "limit": None}, "labels": {"trained_classes": 10},
            "sizes": {"clean": 2000}, "defenses": [{"name": "none"}],
            "clusters": {"num_clusters": 10, "purity": {"true labels": purity, "attacker labels": purity},
                         "oracle": oracle is not None}}


def test_impure_clusters_are_warned_with_the_oracle_next_to_the_protected_peak():
    (warning,) = audit_warnings(_report(0.58))
    assert warning.startswith("cluster purity w.r.t. the attacker's labels is 0.58: below about 0.9")
    assert "oracle, clusters = the attacker's classes: 20.0 % vs protected 85.0 %" in warning
    (no_oracle,) = audit_warnings(_report(0.58, oracle=None))
    assert "protects little;" in no_oracle
    assert audit_warnings(_report(0.95)) == []
