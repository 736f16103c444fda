"""The user's data is sacred: no input overwritten, nothing deleted that a run did not write, one writer
per output, and a completed output is one that checks out.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from conftest import encode, make_dataset, make_samples, protect_cli, read_tar, tree, write_shard
from ue_datasets import UEDatasetsError
from ue_datasets.apply.commit import OutputBusy, OutputLock
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards

REPO = Path(__file__).resolve().parents[1]




# --------------------------------------------------------------------------- outputs that alias the input


@pytest.mark.parametrize("spelling", ["in/../in", "//{tmp}/in/.", "link"])
def test_an_output_naming_the_input_folder_another_way_is_refused(tmp_path, shards, prot, capsys, spelling):
    os.symlink(tmp_path / "in", tmp_path / "link")
    before = tree(tmp_path / "in")
    out = spelling.format(tmp=str(tmp_path).lstrip("/"))
    os.chdir(tmp_path)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", out) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert tree(tmp_path / "in") == before


def test_an_output_the_input_pattern_would_read_back_is_refused(tmp_path, shards, prot, capsys):
    before = tree(tmp_path / "in")
    pattern = str(tmp_path / "in" / "**" / "*.tar")
    assert protect_cli("--protection", prot, "--input", pattern, "--output", str(tmp_path / "in" / "protected")) == 2
    assert "read protected files back" in capsys.readouterr().err
    assert tree(tmp_path / "in") == before
    # a plain folder input is not read recursively: a subfolder of it is a fine output
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "p")) == 0


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_a_dataset_output_that_is_holds_or_lies_in_the_input_is_refused_even_with_overwrite(
        tmp_path, dataset_dir, prot, capsys, where):
    out = {"same": dataset_dir, "parent": dataset_dir.parent, "inside": dataset_dir / "protected"}[where]
    before = tree(tmp_path / "data")
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out), "--overwrite") == 2
    assert "input dataset" in capsys.readouterr().err
    assert tree(tmp_path / "data") == before


def test_overwrite_replaces_only_what_ue_datasets_wrote(tmp_path, dataset_dir, prot, other_protection, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out), "--overwrite") == 2
    assert "not a dataset written by ue-datasets" in capsys.readouterr().err
    assert tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    (out / "notes.txt").unlink()
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out)) == 0
    (out / "notes.txt").write_text("mine")  # the user adds a file to a finished output
    other = str(other_protection.save(tmp_path / "other"))
    assert protect_cli("--protection", other, "--input", str(dataset_dir), "--output", str(out), "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert len(datasets.load_from_disk(str(out))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other", "out", "prot"]  # no partial, no lock


def test_a_shard_output_folder_holding_someone_elses_file_of_that_name_is_refused(tmp_path, shards, prot, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-01.tar").write_bytes(b"not ours")
    for extra in ([], ["--overwrite"]):
        assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                    *extra) == 2
        assert "was not written by ue-datasets" in capsys.readouterr().err
    assert (tmp_path / "out" / "shard-01.tar").read_bytes() == b"not ours"


def test_a_chained_url_output_is_refused(tmp_path, shards, prot, capsys):
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o1")) == 0
    before = tree(tmp_path / "o1")
    out = f"simplecache::file://{tmp_path / 'o1'}"
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "o1"), "--output", out, "--overwrite") == 2
    assert "chained fsspec URLs" in capsys.readouterr().err
    assert tree(tmp_path / "o1") == before


def test_files_named_like_ours_that_we_did_not_write_are_kept(tmp_path, shards, prot, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00.tar.partial-backup").mkdir()
    (out / "shard-00.tar.partial-backup" / "f").write_text("mine")
    (out / "shard-01.tar.partial-old").write_text("mine")
    (out / "shard-02.tar.lock").write_text("my notes")
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(out)) == 2
    assert "not a ue-datasets lock file" in capsys.readouterr().err
    (out / "shard-02.tar.lock").rename(tmp_path / "notes")
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(out)) == 0
    assert (out / "shard-00.tar.partial-backup" / "f").read_text() == "mine"
    assert (out / "shard-01.tar.partial-old").read_text() == "mine"


def test_dataset_stats_naming_files_outside_the_output_are_not_trusted(tmp_path, dataset_dir, prot, capsys):
    out = tmp_path / "out"
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out)) == 0
    (tmp_path / "victim.txt").write_text("mine")
    stats = json.loads((out / "ue_datasets_stats.json").read_text())
    stats["files"].update({"../victim.txt": None, str(tmp_path / "victim.txt"): None})
    (out / "ue_datasets_stats.json").write_text(json.dumps(stats))
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out), "--overwrite") == 2
    assert "not a dataset written by ue-datasets" in capsys.readouterr().err
    assert (tmp_path / "victim.txt").read_text() == "mine"


def test_a_dataset_output_file_that_we_did_not_write_is_not_replaced(tmp_path, dataset_dir, prot, capsys):
    out = tmp_path / "out"
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(out)) == 0
    (out / "dataset_dict.json").write_text("mine")
    splits = datasets.DatasetDict({"train": datasets.load_from_disk(str(dataset_dir))})
    splits.save_to_disk(str(tmp_path / "dsd"))
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "dsd"), "--output", str(out), "--overwrite") == 2
    assert "dataset_dict.json, which ue-datasets did not write" in capsys.readouterr().err
    assert (out / "dataset_dict.json").read_text() == "mine"
    assert len(datasets.load_from_disk(str(out))) == 6  # the previous output is untouched


def test_an_empty_output_is_refused(tmp_path, shards, dataset_dir, prot, capsys, monkeypatch):
    from ue_datasets.apply.shards import plan

    with pytest.raises(UEDatasetsError, match="the output is empty"):  # checked before anything is written
        plan(shards, "")
    monkeypatch.chdir(tmp_path)  # should a regression write anything, it lands here
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", "") == 2
    assert "the output is empty" in capsys.readouterr().err


def test_leftovers_of_killed_runs_are_removed_and_old_stats_are_ours(tmp_path, shards, dataset_dir, protection,
                                                                    prot):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-00_stats.json.partial-12-deadbeef").write_text("{")
    (out / "shard-01.tar.partial-12-deadbeef").write_text("half")
    (out / "shard-02.tar").write_bytes(b"old output")  # written by a version whose stats named a path
    (out / "shard-02_stats.json").write_text(json.dumps({"output": str(out / "shard-02.tar"),
                                                         "protection": protection.public()}))
    protect_shards(protection, shards, str(out), ShardOptions(device="cpu"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"shard-{i:02d}.tar" for i in range(3)] + [f"shard-{i:02d}_stats.json" for i in range(3)])
    dso = tmp_path / "dso"
    dso.mkdir()  # a commit killed while it wrote the first stats file
    (dso / "ue_datasets_stats.json.partial-12-deadbeef").write_text("{")
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(dso)) == 0
    assert not [p for p in dso.iterdir() if ".partial-" in p.name]


def test_a_dataset_output_with_a_trailing_slash_keeps_its_partial_and_lock_beside_it(tmp_path, dataset_dir, prot,
                                                                                     monkeypatch):
    from ue_datasets.apply import sources

    seen = []
    real = sources._commit_dataset
    monkeypatch.setattr(sources, "_commit_dataset", lambda partial, *a: (seen.append(partial), real(partial, *a)))
    out = str(tmp_path / "out") + "/"
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", out) == 0
    assert os.path.dirname(seen[0]) == str(tmp_path) and sorted(os.listdir(tmp_path)).count("out") == 1
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", out) == 0
    assert json.loads((tmp_path / "out" / "ue_datasets_stats.json").read_text())["output"] == "out"


# --------------------------------------------------------------------------- one writer per output


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder_give_complete_identical_shards(tmp_path, protection, prot):
    (tmp_path / "in").mkdir()
    for i in range(8):
        write_shard(tmp_path / "in" / f"s{i}.tar", make_samples(12, seed=i, fmt="png"))
    cmd = [sys.executable, "-m", "ue_datasets.cli", "protect", "--protection", prot, "--input", str(tmp_path / "in"),
           "--no-progress", "--device", "cpu"]
    runs = [subprocess.Popen([*cmd, "--output", str(tmp_path / "out")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    for r in runs:
        assert r.wait(timeout=240) == 0, r.stderr.read().decode()
    protect_shards(protection, str(tmp_path / "in"), str(tmp_path / "clean"), ShardOptions(device="cpu"),
                   progress=False)
    assert tree(tmp_path / "out").keys() == tree(tmp_path / "clean").keys()
    for name in tree(tmp_path / "clean"):
        if name.endswith(".tar"):
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.slow
def test_a_file_another_process_is_writing_is_waited_for_then_taken(tmp_path, shards, protection):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ue_datasets.apply.commit import OutputLock;"
        f"OutputLock({str(out / 'shard-01.tar')!r}).claim(); print('held', flush=True); time.sleep(3)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # an orphaned writer, killed with its lock still held
    with pytest.raises(OutputBusy):
        OutputLock(str(out / "shard-01.tar")).claim()
    start = time.monotonic()
    stats = protect_shards(protection, shards, str(out), ShardOptions(device="cpu"), progress=False)
    assert time.monotonic() - start > 1 and holder.poll() is not None
    assert [s["resumed"] for s in stats] == [False, False, False]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"shard-{i:02d}.tar" for i in range(3)] + [f"shard-{i:02d}_stats.json" for i in range(3)])


# --------------------------------------------------------------------------- resume trusts only what checks out


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_damaged_output_is_redone_not_reported_done(tmp_path, shards, protection, damage):
    first = protect_shards(protection, shards, str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)
    target = tmp_path / "out" / "shard-01.tar"
    good = target.read_bytes()
    assert first[1]["bytes"] == len(good) and first[1]["sha256"] == hashlib.sha256(good).hexdigest()
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(good[: len(good) // 2])
    else:
        target.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    again = protect_shards(protection, shards, str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)
    assert [s["resumed"] for s in again] == [True, False, True]
    assert target.read_bytes() == good


def test_a_rerun_with_other_settings_or_a_changed_input_redoes_the_output(tmp_path, protection):
    samples = make_samples(3, fmt="png")
    for s in samples:
        s["seg.png"] = encode(make_dataset(1)[0][0])
    shard = write_shard(tmp_path / "in.tar", samples)
    keep = ShardOptions(device="cpu", keep_fields=("seg.png",))
    (first,) = protect_shards(protection, [shard], str(tmp_path / "out"), keep, progress=False)
    assert read_tar(tmp_path / "out" / "in.tar")[0]["seg.png"] == samples[0]["seg.png"]
    (again,) = protect_shards(protection, [shard], str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)
    assert again["resumed"] is False
    assert read_tar(tmp_path / "out" / "in.tar")[0]["seg.png"] != samples[0]["seg.png"]
    write_shard(tmp_path / "in.tar", make_samples(4, seed=9, fmt="png"))
    (changed,) = protect_shards(protection, [shard], str(tmp_path / "out"), ShardOptions(device="cpu"),
                                progress=False)
    assert changed["resumed"] is False and changed["written"] == 4


def test_a_concurrent_run_with_another_protection_is_reported_not_hidden(tmp_path, shards, protection,
                                                                         other_protection):
    from ue_datasets.apply import shards as shard_run
    from ue_datasets.apply.wds import protect_shard

    def rival(prot, in_url, out_url, options, progress, overwrite):
        stats = protect_shard(prot, in_url, out_url, options, progress, overwrite)
        if in_url == shards[-1]:  # meanwhile, another run with another protection rewrites the first file
            protect_shard(other_protection, shards[0], out_url.replace("shard-02", "shard-00"), options, None, True)
        return stats

    with pytest.raises(UEDatasetsError, match="another run with another protection"):
        shard_run.run(rival, protection, shards, str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)


@pytest.mark.slow
def test_workers_die_with_a_killed_run(tmp_path, prot):
    import signal
    import uuid

    import numpy as np
    from PIL import Image

    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # big enough that a worker is still busy well after the kill
        write_shard(tmp_path / "in" / f"s{i}.tar", [
            {"__key__": f"k{j:04d}", "png": encode(Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))),
             "cls": b"1"} for j in range(600)])
    mark = uuid.uuid4().hex
    run = subprocess.Popen([sys.executable, "-m", "ue_datasets.cli", "protect", "--protection", prot, "--input",
                            str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "2",
                            "--batch-size", "4", "--no-progress", "--device", "cpu"],
                           env={**os.environ, "UE_TEST_MARK": mark}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def marked() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if f"UE_TEST_MARK={mark}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(marked()) >= 2, "the workers should be writing"
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 1.5
    while marked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marked() == [], "orphaned workers go on after the run was killed"
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--workers", "2") == 0
    assert not [p for p in (tmp_path / "out").iterdir() if ".partial-" in p.name or p.suffix == ".lock"]


def test_stats_name_files_not_paths_of_the_protectors_machine(tmp_path, shards, dataset_dir, prot):
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")) == 0
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(tmp_path / "dso")) == 0
    for stats_file in [*(tmp_path / "out").glob("*_stats.json"), tmp_path / "dso" / "ue_datasets_stats.json"]:
        text = stats_file.read_text()
        assert str(tmp_path) not in text and "/tmp" not in text, stats_file
