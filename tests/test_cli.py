"""The `ue-datasets` command line: fit, protect (shards, dataset dirs, parquet), inspect, demo, errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import datasets
import pytest

from conftest import make_samples, read_tar, write_shard
from ue_datasets.cli import build_parser, main


def _fit(tmp_path, *extra):
    out = tmp_path / "prot"
    assert main(["fit", "cuda", "--num-classes", "10", "--key", "987654321", "-o", str(out), *extra]) == 0
    return out


def test_fit_writes_an_artifact_and_inspect_never_shows_the_key(tmp_path, capsys):
    out = _fit(tmp_path, "--kernel-size", "5", "--blur", "0.1")
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads(printed)
    assert manifest["method"] == "convolution" and manifest["params"]["kernel_size"] == 5
    assert "987654321" not in printed and "987654321" not in (out / "manifest.json").read_text()


def test_protect_shards_from_brace_pattern_writes_same_names_and_stats(tmp_path, capsys):
    prot = _fit(tmp_path)
    (tmp_path / "in").mkdir()
    for i in range(3):
        write_shard(tmp_path / "in" / f"train-{i:03d}.tar", make_samples(4, seed=i))
    pattern = str(tmp_path / "in" / "train-{000..002}.tar")
    assert main(["protect", "--protection", str(prot), "--input", pattern, "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert "protected 12 of 12 samples" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"train-{i:03d}{s}" for i in range(3) for s in (".tar", "_stats.json")]
    assert main(["protect", "--protection", str(prot), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--no-progress"]) == 0
    assert "3 already done" in capsys.readouterr().out


def test_protect_dataset_directory_gives_a_loadable_dataset_directory(tmp_path):
    prot = _fit(tmp_path)
    samples = make_samples(6, fmt="png")
    from conftest import decode_display

    ds = datasets.Dataset.from_dict(
        {"image": [decode_display(s["png"]) for s in samples], "label": [int(s["cls"]) for s in samples]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "hf"))
    assert main(["protect", "--protection", str(prot), "--input", str(tmp_path / "hf"), "--output",
                 str(tmp_path / "hf-out"), "--no-progress"]) == 0
    out = datasets.load_from_disk(str(tmp_path / "hf-out"))
    assert set(out) == {"train", "test"} and len(out["train"]) == 6 and len(out["test"]) == 2
    assert isinstance(out["train"].features["image"], datasets.Image)
    assert not list((tmp_path / "hf").glob("cache-*"))  # nothing written next to the input


def test_bad_sample_fails_with_shard_and_key_and_exit_code_2(tmp_path, capsys):
    prot = _fit(tmp_path)
    samples = make_samples(4)
    samples[2]["cls"] = b"17"
    shard = write_shard(tmp_path / "bad.tar", samples)
    assert main(["protect", "--protection", str(prot), "--input", shard, "--output", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.tar" in err and repr(samples[2]["__key__"]) in err and "out of range" in err
    assert not (tmp_path / "out" / "bad.tar").exists()
    assert main(["protect", "--protection", str(prot), "--input", shard, "--output", str(tmp_path / "out"),
                 "--on-error", "skip", "--max-skipped", "1", "--no-progress"]) == 0
    stats = json.loads((tmp_path / "out" / "bad_stats.json").read_text())
    assert stats["skipped"] == [{"key": samples[2]["__key__"], "reason": "label 17 is out of range [0, 10)"}]
    assert [s["__key__"] for s in read_tar(tmp_path / "out" / "bad.tar")] == [
        s["__key__"] for i, s in enumerate(samples) if i != 2
    ]


def test_pipe_urls_and_missing_inputs_are_refused(tmp_path, capsys):
    prot = _fit(tmp_path)
    marker = tmp_path / "ran"
    assert main(["protect", "--protection", str(prot), "--input", f"pipe:touch {marker}", "--output",
                 str(tmp_path / "out")]) == 2
    assert not marker.exists() and "pipe:" in capsys.readouterr().err
    assert main(["protect", "--protection", str(prot), "--input", str(tmp_path / "nope.tar"), "--output",
                 str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tampered_artifact_is_refused(tmp_path, capsys):
    prot = _fit(tmp_path)
    manifest = json.loads((prot / "manifest.json").read_text())
    manifest["params"]["blur"] = 0.9
    (prot / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(prot), "--verify"]) == 2
    assert "digest mismatch" in capsys.readouterr().err


def test_demo_writes_protected_shard_and_grid(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "protected 300 of 300" in out
    for name in ("before_after.png", "shards/fashion-mnist-demo.tar", "shards/fashion-mnist-demo_stats.json",
                 "protection/manifest.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    from PIL import Image

    assert Image.open(tmp_path / "demo" / "before_after.png").size[0] > 500


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_of_every_command_has_help():
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{parser.prog} {action.option_strings} has no help"


@pytest.mark.parametrize("argv", [[], ["fit"], ["fit", "cuda"], ["protect"], ["inspect"], ["demo"]])
def test_help_prints_usage_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: ue-datasets" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "ue_datasets.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ue-datasets ")


def test_the_cli_max_pixels_default_is_the_decoders():
    from ue_datasets import cli_parser as cli
    from ue_datasets.apply.images import DEFAULT_MAX_PIXELS

    assert cli.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS
