"""Every failure is one line naming the file, and leaves nothing under a final name; the package
imports from a clone's root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import encode, make_dataset, protect_cli, write_shard
from ue_datasets.apply.shards import ShardOptions

REPO = Path(__file__).resolve().parents[1]




# --------------------------------------------------------------------------- one-line errors naming the file


def _parquet(path: Path, groups: int = 2, rows: int = 10) -> Path:
    images, labels = make_dataset(groups * rows)
    table = pa.table({"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels})
    pq.write_table(table, path, row_group_size=rows)
    return path


def test_parquet_output_keeps_the_input_row_groups(tmp_path, protection):
    from ue_datasets.apply.parquet import protect_parquet

    src = _parquet(tmp_path / "a.parquet", groups=3, rows=10)
    protect_parquet(protection, [str(src)], str(tmp_path / "out"),
                    ShardOptions(label_field="label", image_field="image", batch_size=4, device="cpu"), progress=False)
    meta = pq.ParquetFile(tmp_path / "out" / "a.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 10]


def test_a_corrupt_parquet_row_group_is_one_line_naming_the_file(tmp_path, prot, capsys):
    (tmp_path / "in").mkdir()
    src = _parquet(tmp_path / "in" / "a.parquet")
    meta = pq.ParquetFile(src).metadata
    start = meta.row_group(1).column(0).file_offset
    data = bytearray(src.read_bytes())
    data[start - 200:start] = b"\xff" * 200  # the second row group's image pages
    src.write_bytes(bytes(data))
    assert protect_cli("--protection", prot, "--input", str(src), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.parquet" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("a.parquet")]


@pytest.mark.parametrize("damage", ["missing arrow", "truncated arrow", "bad state.json"])
def test_a_damaged_dataset_directory_is_one_line_naming_it(tmp_path, dataset_dir, prot, capsys, damage):
    arrow = next(dataset_dir.glob("*.arrow"))
    if damage == "missing arrow":
        arrow.unlink()
    elif damage == "truncated arrow":
        arrow.write_bytes(arrow.read_bytes()[:200])
    else:
        (dataset_dir / "state.json").write_text("{not json")
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dataset_dir) in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_and_a_bad_dataset_info_are_one_line_errors(tmp_path, shards, dataset_dir,
                                                                              prot, capsys):
    (tmp_path / "afile").write_text("mine")
    for src in (str(tmp_path / "in"), str(dataset_dir)):
        assert protect_cli("--protection", prot, "--input", src, "--output", str(tmp_path / "afile")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "afile" in err and "is a file" in err
    assert (tmp_path / "afile").read_text() == "mine"
    (dataset_dir / "dataset_info.json").write_text("null")
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dataset_dir) in err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_and_read_only_outputs_are_one_line_naming_the_output(tmp_path, prot, small_disk, capsys):
    (tmp_path / "in").mkdir()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i}", "png": encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))),
                "cls": b"1"} for i in range(40)]  # about 500 KiB of PNG: more than the disk holds
    write_shard(tmp_path / "in" / "big.tar", samples)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(small_disk / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "big.tar" in err and "No space left" in err and ".partial-" not in err
    assert sorted(p.name for p in (small_disk / "out").iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(small_disk / "out2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out2" in err and "Read-only" in err


# --------------------------------------------------------------------------- importing from a clone


@pytest.mark.slow
def test_transforms_import_from_the_clones_root_without_the_editable_finder():
    script = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', ''))];"
        "import ue_datasets; from ue_datasets.transforms import Protect;"
        "assert ue_datasets.__file__.startswith(sys.argv[1]), ue_datasets.__file__;"
        "print(Protect.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(REPO)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ue_datasets.transforms.protect"
