"""``ue-datasets fit em`` and ``fit salm``: artifacts that protect, inspect and verify like every method's."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from conftest import png_pixels, read_tar
from test_em import _shard

from ue_datasets.artifact import load_protection
from ue_datasets.cli import main

FAST = ["--surrogate", "small-cnn", "--device", "cpu", "--batch-size", "16", "--train-steps", "2", "--max-rounds", "2",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _temporary_dirs_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.mark.parametrize("method", [["em", "--mode", "classwise"], ["em", "--mode", "samplewise", "--pgd-steps", "2"],
                                    ["salm", "--mask-ratio", "0.2", "--pgd-steps", "2"]])
def test_fit_protect_inspect_and_verify_from_the_command_line(tmp_path, capsys, method):
    shard = _shard(tmp_path / "in" / "s-000.tar", n=24)
    art = tmp_path / "art"
    assert main(["fit", *method, "--input", shard, "--label-field", "cls", *FAST, "-o", str(art)]) == 0
    said = capsys.readouterr().out
    assert "rounds (stopped by max_rounds" in said and "keep this directory secret" in said
    assert not (tmp_path / "art.cache").exists()  # the cache goes once the artifact is written
    protection = load_protection(art)
    assert protection.method == method[0] and protection.params["max_rounds"] == 2
    assert (art / "bank").is_dir() == (protection.params["lookup"] == "key")
    assert main(["protect", "--protection", str(art), "--input", shard, "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    clean = [png_pixels(s["png"]) for s in read_tar(shard)]
    out = [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")]
    eps_levels = round(255 * protection.params["eps"])
    assert all((a.int() - b.int()).abs().max() <= eps_levels for a, b in zip(clean, out))
    assert sum(not torch.equal(a, b) for a, b in zip(clean, out)) >= len(clean) // 2
    if method[0] == "salm":
        budget = int(0.2 * 12 * 12)
        assert all(int((a != b).sum()) <= budget for a, b in zip(clean, out))
    capsys.readouterr()
    assert main(["inspect", str(art), "--verify"]) == 0
    said = capsys.readouterr()
    manifest = json.loads(said.out)
    assert "digest verified" in said.err and ("noise bank" in said.err) == (protection.bank is not None)
    assert manifest["method"] == method[0]
    assert main(["verify", "--protection", str(art), "--input", str(tmp_path / "out"), "--clean", shard,
                 "--no-progress"]) == 0


def test_fit_em_help_teaches_each_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "em", "--help"])
    text = capsys.readouterr().out
    for option in ("--mode", "--surrogate", "--eps", "--step-size", "--pgd-steps", "--train-steps", "--stop-accuracy",
                   "--max-rounds", "--legacy-clamp", "--device", "--seed", "--cache"):
        assert option in text


def test_a_cache_or_output_holding_other_files_is_refused_before_fitting_and_left_as_it_is(tmp_path, capsys):
    shard = _shard(tmp_path / "in" / "s-000.tar", n=12)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = ["fit", "em", "--mode", "classwise", "--input", shard, *FAST]
    assert main([*args, "--cache", str(tmp_path / "mine"), "-o", str(tmp_path / "art")]) != 0
    assert "was not made by a ue-datasets fit" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "mine")]) != 0
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
