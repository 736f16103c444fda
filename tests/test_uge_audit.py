"""UGE in the command line and the audit: ``fit uge``, ``audit --authorized`` and the authorized rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import gray_shard, template_task
from PIL import Image

import ue_datasets
from ue_datasets import UEDatasetsError
from ue_datasets.artifact import Protection, load_protection
from ue_datasets.audit import AuditConfig, run_audit
from ue_datasets.audit import run as audit_run
from ue_datasets.audit.checks import AUTHORIZED_GAP, audit_warnings
from ue_datasets.cli import main

SIZE, CLASSES, EPS = 8, 4, 8 / 255


def fake_uge(seed: int, size: int = SIZE, channels: int = 1) -> Protection:
    """A UGE protection without a fit: fixed class-wise deltas (the same for every seed), secret ``seed``."""
    deltas = (torch.rand(CLASSES, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPS
    return Protection("uge", {"lookup": "class", "eps": EPS, "num_classes": CLASSES,
                              "authorized": {"arch": "small-cnn", "num_classes": CLASSES, "in_channels": channels,
                                             "image_size": size}},
                      {"deltas": deltas, "authorized_seed": torch.tensor([seed])})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Clean and test shards; UGE artifacts of seeds 7 and 8 and a CUDA one, each with its protected set."""
    from ue_datasets.fit.convolution import fit_convolution

    root = tmp_path_factory.mktemp("uge-audit")
    out = {"root": root, "clean": gray_shard(root / "clean", *template_task(0, 32), "k"),
           "test": gray_shard(root / "test", *template_task(1, 16), "t")}
    for name, protection in (("uge7", fake_uge(7)), ("uge8", fake_uge(8)), ("cuda", fit_convolution(CLASSES, key=7))):
        protection.save(root / name)
        assert main(["protect", "--protection", str(root / name), "--input", out["clean"], "--output",
                     str(root / f"{name}-protected"), "--no-progress"]) == 0
        out[name], out[f"{name}-protected"] = str(root / name), str(root / f"{name}-protected")
    return out


def _config(data, name: str = "uge7", **kw) -> AuditConfig:
    return AuditConfig(**{"epochs": 1, "batch_size": 16, "device": "cpu", "authorized": data[name], **kw})


def test_audit_trains_a_fresh_authorized_network_from_the_secret_initialisation_under_every_defense(
        data, tmp_path, monkeypatch):
    import ue_datasets.fit.uge as uge

    built, trained = [], []
    real_build, real_train = uge.authorized_model, audit_run.train_model

    def building(protection):
        model = real_build(protection)
        built.append(model)
        return model

    def training(model, x, y, *args, **kwargs):
        trained.append((model, {k: v.clone() for k, v in model.state_dict().items()}, x.clone()))
        return real_train(model, x, y, *args, **kwargs)

    monkeypatch.setattr(uge, "authorized_model", building)
    monkeypatch.setattr(audit_run, "train_model", training)
    report = run_audit(data["uge7-protected"], data["clean"], data["test"], tmp_path / "r",
                       _config(data, defenses=("none", "bdr")), progress=False)
    assert [(r["defense"], r["training_set"]) for r in report["results"]] == [
        (d, s) for d in ("none", "bdr:2") for s in ("clean", "protected", "authorized", "authorized-clean")]
    # one fresh network per authorized run, each starting from the artifact's secret initialisation
    assert len(built) == len(trained) == 4 and len({id(m) for m in built}) == 4
    secret = real_build(load_protection(data["uge7"])).state_dict()
    assert all(torch.equal(state[k], secret[k]) for _, state, _ in trained for k in secret)
    other = real_build(fake_uge(8)).state_dict()
    assert not all(torch.equal(trained[0][1][k], other[k]) for k in other)
    protected = audit_run.load_labelled(data["uge7-protected"]).images
    assert torch.equal(trained[0][2], protected)  # none / authorized: the protected set
    assert torch.equal(trained[1][2], audit_run.load_labelled(data["clean"]).images)  # none / authorized-clean

    section = report["authorized"]
    assert section == {"artifact": data["uge7"], "id": load_protection(data["uge7"]).id, "arch": "small-cnn",
                       "num_classes": CLASSES, "in_channels": 1, "image_size": SIZE}
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["authorized"] == section and "authorized_seed" not in json.dumps(saved)  # the secret stays out
    assert [s["setting"] for s in report["cost"]["settings"]][:4] == [
        "none / clean", "none / protected", "none / authorized", "none / authorized-clean"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "authorized-trained peak" in md and "authorized-clean-trained final" in md
    assert "## Authorized network" in md
    assert Image.open(tmp_path / "r" / "accuracy.png").size[0] > 200


def test_authorized_rows_follow_the_secret_seed_and_repeat_with_it(data, tmp_path):
    def losses(name: str, run: str) -> list[list[float]]:
        report = run_audit(data[f"{name}-protected"], None, data["test"], tmp_path / run,
                           _config(data, name, baseline=False), progress=False)
        assert [r["training_set"] for r in report["results"]] == ["protected", "authorized"]
        return [r["train_loss"] for r in report["results"]]

    first, again, other = losses("uge7", "a"), losses("uge7", "b"), losses("uge8", "c")
    assert first == again
    # the same protected pixels (the deltas do not depend on the seed) and the same target model: only the
    # authorized network's initialisation differs
    assert other[0] == first[0] and other[1] != first[1]


def test_no_clean_baseline_trains_no_authorized_clean_set(data, tmp_path):
    report = run_audit(data["uge7-protected"], data["clean"], data["test"], tmp_path / "r",
                       _config(data, baseline=False), progress=False)
    assert [r["training_set"] for r in report["results"]] == ["protected", "authorized"]


def test_an_authorized_artifact_other_than_the_protected_sets_is_refused(data, tmp_path):
    with pytest.raises(UEDatasetsError, match="is not the id"):
        run_audit(data["cuda-protected"], data["clean"], data["test"], tmp_path / "r", _config(data), progress=False)
    with pytest.raises(UEDatasetsError, match="is not the id"):
        run_audit(data["uge8-protected"], data["clean"], data["test"], tmp_path / "r", _config(data), progress=False)
    with pytest.raises(UEDatasetsError, match="different protections"):  # a set without stats names none
        run_audit(data["clean"], data["clean"], data["test"], tmp_path / "r",
                  _config(data, protection=data["uge8"]), progress=False)


def test_an_artifact_without_an_authorized_network_is_refused(data, tmp_path):
    with pytest.raises(UEDatasetsError, match="no authorized network"):
        run_audit(data["cuda-protected"], data["clean"], data["test"], tmp_path / "r", _config(data, "cuda"),
                  progress=False)


def test_relabelling_with_an_authorized_network_is_refused(data, tmp_path):
    with pytest.raises(UEDatasetsError, match="--relabel"):
        run_audit(data["uge7-protected"], data["clean"], data["test"], tmp_path / "r",
                  _config(data, relabel="merge:2"), progress=False)


def test_data_the_authorized_network_cannot_take_is_refused(tmp_path):
    clean = gray_shard(tmp_path / "clean", *template_task(0, 8), "k")
    test = gray_shard(tmp_path / "test", *template_task(1, 8), "t")
    for name, protection, message in (("big", fake_uge(7, size=16), "built for 16 px.*--image-size 16"),
                                      ("rgb", fake_uge(7, channels=3), "3-channel images, the data has 1")):
        protection.save(tmp_path / name)
        config = AuditConfig(epochs=1, device="cpu", authorized=str(tmp_path / name))
        with pytest.raises(UEDatasetsError, match=message):
            run_audit(clean, clean, test, tmp_path / "r", config, progress=False)


def _report(authorized: float, authorized_clean: float) -> dict:
    results = [{"defense": "none", "training_set": s, "test_accuracy": [p] * 4, "peak": p}
               for s, p in (("clean", 0.9), ("protected", 0.2), ("authorized", authorized),
                            ("authorized-clean", authorized_clean))]
    return {"results": results, "config": {"epochs": 4, "limit": None}, "labels": {"trained_classes": 4},
            "sizes": {"clean": 4000}, "defenses": [{"name": "none"}], "clusters": None}


def test_an_authorized_network_hindered_by_the_protection_is_warned():
    warnings = audit_warnings(_report(0.5, 0.9))
    assert len(warnings) == 1 and "authorized network learns the protected set much worse" in warnings[0]
    assert "50.0 % vs 90.0 %" in warnings[0] and "--rounds" in warnings[0]
    assert audit_warnings(_report(0.9 - AUTHORIZED_GAP + 0.01, 0.9)) == []
    report = _report(0.1, 0.9)
    report["results"] = report["results"][:3]  # no authorized-clean row: nothing to compare with
    assert audit_warnings(report) == []


def test_cli_audit_takes_authorized(data, tmp_path, capsys):
    assert main(["audit", "--protected", data["uge7-protected"], "--clean", data["clean"], "--test", data["test"],
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--authorized", data["uge7"],
                 "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "authorized-trained peak" in out and "| none |" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["authorized"] == data["uge7"]
    assert [r["training_set"] for r in report["results"]] == ["clean", "protected", "authorized", "authorized-clean"]
    assert main(["audit", "--protected", data["uge7-protected"], "--test", data["test"], "--authorized", data["uge7"],
                 "--relabel", "merge:2", "-o", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "--relabel" in capsys.readouterr().err


def test_cli_fit_uge_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "uge", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--label-field", "--image-field", "--key-field", "--num-classes", "--authorized",
                 "--authorized-seed", "--encoder", "--eps", "--resolution", "--lambda-gm", "--lambda-fd",
                 "--lambda-ud", "--tau", "--rounds", "--train-steps", "--pgd-steps", "--step-size", "--batch-size",
                 "--lr", "--limit", "--seed", "--device", "--cache", "--keep-cache", "--output", "--overwrite",
                 "--no-progress"):
        assert flag in out, flag
    text = " ".join(out.split())
    assert "Ye & Wang, CVPR 2024" in text and "ue_datasets.authorized_model(DIR)" in text


def test_cli_fit_uge_saves_the_artifact_drops_its_cache_and_refuses_a_non_empty_output(data, tmp_path, capsys):
    out = tmp_path / "uge"
    argv = ["fit", "uge", "--input", data["clean"], "--authorized-seed", "5", "--rounds", "1", "--train-steps", "1",
            "--pgd-steps", "1", "--batch-size", "8", "--device", "cpu", "-o", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fitted uge" in printed and "32 images, 4 classes" in printed and "gm " in printed
    assert "keep this directory secret" in printed
    assert not (tmp_path / "uge.cache").exists()
    protection = load_protection(out)
    assert protection.method == "uge" and protection.params["rounds"] == 1
    net = ue_datasets.authorized_model(out)
    assert net(torch.rand(2, 1, SIZE, SIZE)).shape == (2, CLASSES)
    assert ue_datasets.fit_uge is ue_datasets.fit.fit_uge
    assert main(argv) == 2  # refused before fitting
    assert "--overwrite" in capsys.readouterr().err
