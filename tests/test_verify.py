"""`verify`: a protected output is checked against its artifact and its clean source before publication."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import (
    decode_display, encode, make_dataset, make_samples, protect_cli, read_tar, restat_shard, write_shard,
)
from ue_datasets import UEDatasetsError, fit_convolution
from ue_datasets.apply.verify import verify


@pytest.fixture
def out(tmp_path, shards, prot):
    """The ``shards`` fixture protected with ``prot`` into ``tmp_path/out``; its path."""
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")) == 0
    return tmp_path / "out"


def _replace(shard, key, field, data):
    """Rewrite ``shard`` with ``field`` of sample ``key`` set to ``data``."""
    samples = read_tar(str(shard))
    next(s for s in samples if s["__key__"] == key)[field] = data
    write_shard(str(shard), samples)



def _parquet(path, n=4):
    """A parquet file of ``n`` labelled images at ``path``."""
    import datasets

    images, labels = make_dataset(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(
        {"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    ).to_parquet(str(path))


def test_verify_passes_on_a_fresh_output_and_checks_every_sample(tmp_path, out, prot):
    report = verify(prot, str(out), str(tmp_path / "in"))
    assert report.ok, report.summary()
    assert (report.samples, report.checked, report.protected) == (15, 15, 15)
    assert report.pixels_checked and not report.missing and "OK" in report.summary()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_verify_reports_a_sample_replaced_by_its_clean_image_as_unprotected(tmp_path, out, prot):
    clean = next(s for s in read_tar(str(tmp_path / "in" / "shard-01.tar")) if s["__key__"] == "s001_00002")
    _replace(out / "shard-01.tar", "s001_00002", "png", encode(decode_display(clean["jpg"])))
    report = verify(prot, str(out), str(tmp_path / "in"))
    assert not report.ok and report.checked == 15 and report.protected == 14
    assert [(f.file, f.key) for f in report.unprotected] == [("shard-01.tar", "s001_00002")]
    assert not report.tampered
    assert [f.file for f in report.files] == ["shard-01.tar"]  # and its bytes no longer match its stats


def test_verify_reports_one_altered_pixel_as_tampered(tmp_path, out, prot):
    sample = next(s for s in read_tar(str(out / "shard-02.tar")) if s["__key__"] == "s002_00004")
    pixels = np.asarray(decode_display(sample["png"])).copy()
    pixels[0, 0, 0] ^= 1
    _replace(out / "shard-02.tar", "s002_00004", "png", encode(Image.fromarray(pixels)))
    report = verify(prot, str(out), str(tmp_path / "in"))
    assert [(f.file, f.key) for f in report.tampered] == [("shard-02.tar", "s002_00004")]
    assert "1 of" in report.tampered[0].reason and not report.unprotected
    assert "tampered: 1" in report.summary() and "s002_00004" in report.summary()


def test_verify_reports_a_sample_not_in_the_clean_source_as_foreign(tmp_path, out, prot):
    samples = read_tar(str(out / "shard-00.tar")) + make_samples(1, seed=7, fmt="png")
    write_shard(str(out / "shard-00.tar"), samples)
    report = verify(prot, str(out), str(tmp_path / "in"))
    assert [(f.file, f.key) for f in report.foreign] == [("shard-00.tar", "s007_00000")]
    assert report.checked == 15 and report.protected == 15 and not report.ok


def test_verify_reports_clean_samples_the_output_lacks_as_absent_unless_its_stats_list_them_as_skipped(tmp_path, prot):
    (tmp_path / "in").mkdir()
    samples = make_samples(4, seed=0)
    samples[1]["jpg"] = b"not an image"
    write_shard(str(tmp_path / "in" / "a.tar"), samples)
    write_shard(str(tmp_path / "in" / "b.tar"), make_samples(2, seed=1))
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--on-error", "skip", "--max-skipped", "1") == 0
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "in"))
    assert [(f.file, f.key) for f in report.missing] == [("a.tar", "s000_00001")] and report.ok, report.summary()
    assert "skipped at protect time" in report.missing[0].reason
    restat_shard(tmp_path / "out" / "a.tar", read_tar(str(tmp_path / "out" / "a.tar"))[1:])
    (tmp_path / "out" / "b.tar").unlink()
    (tmp_path / "out" / "b_stats.json").unlink()
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "in"))
    absent = {(f.file, f.key): f.reason for f in report.absent}
    assert set(absent) == {("a.tar", "s000_00000"), ("b.tar", "s001_00000"), ("b.tar", "s001_00001")}
    assert "do not list it as skipped" in absent[("a.tar", "s000_00000")]
    assert "its file is not in the output" in absent[("b.tar", "s001_00000")]
    assert not report.ok and not report.files and "absent: 3" in report.summary()


def test_verify_checks_a_seeded_random_sample(tmp_path, out, prot):
    a = verify(prot, str(out), str(tmp_path / "in"), sample=4, seed=3)
    assert a.ok and a.checked == 4 and a.samples == 15


def test_verify_without_clean_checks_stats_and_reports_unstated_or_changed_files(tmp_path, out, prot):
    assert verify(prot, str(out)).ok
    write_shard(str(out / "shard-03.tar"), make_samples(2, seed=3, fmt="png"))
    _replace(out / "shard-01.tar", "s001_00000", "txt", b"changed\n")
    report = verify(prot, str(out))
    assert not report.pixels_checked and report.checked == 0 and "pixels not checked" in report.summary()
    reasons = {f.file: f.reason for f in report.files}
    assert "changed after protect" in reasons["shard-01.tar"] and "no stats file" in reasons["shard-03.tar"]


def test_verify_reports_an_output_of_another_protection(tmp_path, out, other_protection):
    report = verify(other_protection, str(out), str(tmp_path / "in"))
    assert {f.where for f in report.files} == {"protection.id"} and len(report.files) == 3
    assert len(report.tampered) == 15


def test_verify_reports_paths_digest_and_leftovers_in_what_would_be_published(tmp_path, out, prot):
    stats_file = out / "shard-00_stats.json"
    stats = json.loads(stats_file.read_text())
    digest = json.loads((tmp_path / "prot" / "manifest.json").read_text())["digest"]
    stats["note"] = str(tmp_path / "in" / "shard-00.tar")
    stats["protection"]["digest"] = digest
    stats_file.write_text(json.dumps(stats))
    (out / "shard-01.tar.lock").write_text("{}")
    (out / "README.txt").write_text("made on C:\\Users\\alice\\data\nfine line\n")
    report = verify(prot, str(out), str(tmp_path / "in"))
    leaks = {(f.file, f.where): f.reason for f in report.leaks}
    assert "clean source's path" in leaks[("shard-00_stats.json", "note")]
    assert "digest" in leaks[("shard-00_stats.json", "protection.digest")]
    assert "lock file" in leaks[("shard-01.tar.lock", "")]
    assert "absolute local path" in leaks[("README.txt", "line 1")]
    assert len(report.leaks) == 4 and not report.ok and report.protected == 15
    assert [f.file for f in report.files] == ["README.txt"]  # protect did not write it either


def test_verify_reports_a_local_path_in_a_sample_field(tmp_path, out, prot):
    _replace(out / "shard-02.tar", "s002_00001", "json", json.dumps({"src": "/home/bob/pics/1.jpg"}).encode())
    leaks = verify(prot, str(out)).leaks
    assert [(f.file, f.where) for f in leaks] == [("shard-02.tar", "sample 's002_00001' field 'json'")]


def test_verify_partial_protection_accepts_unselected_samples_left_clean(tmp_path, shards):
    half = fit_convolution(10, key=0, fraction=0.5)
    half.save(tmp_path / "half")
    assert protect_cli("--protection", str(tmp_path / "half"), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out")) == 0
    report = verify(str(tmp_path / "half"), str(tmp_path / "out"), str(tmp_path / "in"))
    assert report.ok and report.protected == 15 and 0 < report.unchanged < 15


def test_verify_dataset_directory_and_a_path_in_its_metadata(tmp_path, dataset_dir, prot):
    dst = tmp_path / "pub"
    assert protect_cli("--protection", prot, "--input", str(dataset_dir), "--output", str(dst)) == 0
    report = verify(prot, str(dst), str(dataset_dir))
    assert report.ok, report.summary()
    assert report.kind == "hf" and report.checked == 6 == report.protected
    info = json.loads((dst / "dataset_info.json").read_text())
    info["description"] = f"built from {dataset_dir}"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    report = verify(prot, str(dst), str(dataset_dir))
    assert [(f.file, f.where) for f in report.leaks] == [("dataset_info.json", "description")]
    assert [f.file for f in report.files] == ["dataset_info.json"]


def test_verify_refuses_a_clean_source_of_another_form(tmp_path, out, prot, dataset_dir):
    with pytest.raises(UEDatasetsError, match="save_to_disk dataset"):
        verify(prot, str(out), str(dataset_dir))


def test_verify_parquet_output_reports_a_local_path_kept_in_a_column(tmp_path, prot):
    import datasets

    images, labels = make_dataset(4)
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(
        {"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels,
         "origin": ["web", "/Users/carol/shots/2.png", "web", "web"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "origin": datasets.Value("string")}),
    ).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "pq"), "--output", str(tmp_path / "out")) == 0
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "pq"))
    assert report.kind == "parquet" and report.protected == 4 and not report.files
    assert [(f.file, f.where) for f in report.leaks] == [("a.parquet", "row 1 column 'origin'")]


def test_the_verify_command_exits_0_when_ok_and_1_on_problems_writing_its_report(tmp_path, out, prot, capsys):
    from ue_datasets.cli import main

    args = ["verify", "--protection", prot, "--input", str(out), "--clean", str(tmp_path / "in"), "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0 and "OK" in capsys.readouterr().out
    _replace(out / "shard-01.tar", "s001_00002", "png", encode(Image.new("RGB", (8, 8))))
    assert main([*args, "--report", str(tmp_path / "report.json")]) == 1
    assert "s001_00002" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is False


def test_verify_reports_every_file_of_an_output_folder_protect_did_not_write(tmp_path, out, prot):
    (out / "backup").mkdir()
    shutil.copy(out / "shard-00.tar", out / "backup" / "a0.tar")
    shutil.copy(out / "shard-01.tar", out / "shard-01.tar.bak")
    (out / "preview.jpg").write_bytes(encode(Image.new("RGB", (4, 4)), "JPEG"))
    (out / "shard-02.tar.lock").write_text("{}")
    report = verify(prot, str(out))
    assert [f.file for f in report.files] == ["backup/a0.tar", "preview.jpg", "shard-01.tar.bak"]
    assert all("not an output file" in f.reason for f in report.files)
    assert [f.file for f in report.leaks] == ["shard-02.tar.lock"]  # a leftover is a leak, not a stray file


def _two_images(tmp_path, prot, *extra):
    """Shards whose samples hold a jpg, a png and a ``mask.png``, protected with ``extra`` options."""
    (tmp_path / "in").mkdir()
    samples = make_samples(3, seed=0)
    for s, im, mask in zip(samples, make_dataset(3, seed=5)[0], make_dataset(3, seed=9)[0]):
        s.update({"png": encode(im), "mask.png": encode(mask.convert("L"))})
    write_shard(str(tmp_path / "in" / "a.tar"), samples)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       *extra) == 0
    return tmp_path / "out" / "a.tar"


def test_verify_checks_every_image_field_of_a_shard_sample_under_its_protected_name(tmp_path, prot):
    shard = _two_images(tmp_path, prot)
    assert verify(prot, str(tmp_path / "out"), str(tmp_path / "in")).ok
    samples = read_tar(str(shard))
    assert {"png", "jpg.png", "mask.png"} <= set(samples[0])
    samples[1]["png"] = read_tar(str(tmp_path / "in" / "a.tar"))[1]["png"]
    restat_shard(shard, samples)
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "in"))
    assert [(f.key, f.reason) for f in report.unprotected] == [
        ("s000_00001", "image 'png': the published image is the clean image")]
    assert report.checked == 3 and report.protected == 2


def test_verify_takes_kept_fields_and_the_clean_image_field_as_protect_did(tmp_path, prot):
    from ue_datasets.cli import main

    shard = _two_images(tmp_path, prot, "--keep-field", "mask.png", "--image-field", "jpg")
    args = ["verify", "--protection", prot, "--input", str(tmp_path / "out"), "--clean", str(tmp_path / "in"),
            "--no-progress", "--device", "cpu", "--keep-field", "mask.png"]
    assert main([*args, "--image-field", "jpg"]) == 0 and main(args) == 0
    assert verify(prot, str(tmp_path / "out"), str(tmp_path / "in")).unprotected  # the mask, unless kept
    samples = read_tar(str(shard))
    samples[2]["mask.png"] = encode(Image.new("L", (8, 8)))
    restat_shard(shard, samples)
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "in"), keep_fields=["mask.png"])
    assert [(f.key, f.reason) for f in report.tampered] == [
        ("s000_00002", "field 'mask.png' differs from the clean source")]


def test_verify_reports_a_label_or_field_that_differs_from_the_clean_source(tmp_path, out, prot):
    samples = read_tar(str(out / "shard-00.tar"))
    samples[0]["cls"] = str((int(samples[0]["cls"]) + 1) % 10).encode()
    samples[1]["txt"] = b"another caption\n"
    restat_shard(out / "shard-00.tar", samples)
    report = verify(prot, str(out), str(tmp_path / "in"))
    assert [(f.key, f.reason) for f in report.tampered] == [
        ("s000_00000", "label differs from the clean source"), ("s000_00001", "field 'txt' differs from the clean source")]
    assert report.checked == 13 and not report.files


def test_verify_reports_a_corrupt_output_file_and_refuses_a_corrupt_clean_one(tmp_path, prot):
    from ue_datasets.cli import main

    _parquet(tmp_path / "pq" / "a.parquet")
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "pq"), "--output", str(tmp_path / "out")) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "a.parquet")
    pq.write_table(table.set_column(1, "label", [[(v.as_py() + 1) % 10 for v in table["label"]]]),
                   tmp_path / "relabelled.parquet")
    shutil.copy(tmp_path / "relabelled.parquet", tmp_path / "out" / "a.parquet")
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "pq"))
    assert {f.reason for f in report.tampered} == {"label differs from the clean source"} and not report.checked
    data = (tmp_path / "out" / "a.parquet").read_bytes()
    (tmp_path / "out" / "a.parquet").write_bytes(data[: len(data) // 2])
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "pq"))
    assert [f.file for f in report.files] == ["a.parquet", "a.parquet"]
    assert "cannot be read" in report.files[1].reason and not report.absent and not report.ok
    (tmp_path / "pq" / "a.parquet").write_bytes(data[:100])
    with pytest.raises(UEDatasetsError, match="cannot read the parquet file"):
        verify(prot, str(tmp_path / "out"), str(tmp_path / "pq"))
    assert main(["verify", "--protection", prot, "--input", str(tmp_path / "out"), "--clean", str(tmp_path / "pq"),
                 "--no-progress", "--device", "cpu"]) == 2


def test_verify_takes_several_clean_inputs(tmp_path, out, prot):
    from ue_datasets.cli import main

    clean = [str(tmp_path / "in" / f"shard-0{i}.tar") for i in range(3)]
    assert verify(prot, str(out), clean).checked == 15
    assert main(["verify", "--protection", prot, "--input", str(out), "--clean", *clean, "--no-progress",
                 "--device", "cpu"]) == 0


def test_verify_takes_latex_for_no_windows_path_but_flags_a_drive_path(tmp_path, out, prot):
    (out / "NOTES.md").write_text("Let $f:\\mathbb{R}\\to\\mathbb{R}$ be smooth.\nfrom C:\\Users\\bob\\x.png\n")
    leaks = verify(prot, str(out)).leaks
    assert [(f.file, f.where) for f in leaks] == [("NOTES.md", "line 2")]
    assert "C:\\Users\\bob\\x.png" in leaks[0].reason


def test_verify_matches_table_rows_after_a_skipped_one_by_their_row_in_the_clean_source(tmp_path, prot):
    import datasets

    images, labels = make_dataset(4)
    cells = [{"bytes": encode(im), "path": None} for im in images]
    cells[1] = {"bytes": b"not an image", "path": None}
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"image": cells, "label": labels}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64")})).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "pq"), "--output", str(tmp_path / "out"),
                       "--on-error", "skip", "--max-skipped", "1") == 0
    report = verify(prot, str(tmp_path / "out"), str(tmp_path / "pq"))
    assert report.ok and report.protected == 3, report.summary()
    assert [(f.file, f.key) for f in report.missing] == [("a.parquet", "1")]


def test_the_verify_report_replaces_only_an_earlier_report(tmp_path, out, prot, capsys):
    from ue_datasets.cli import main

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    args = ["verify", "--protection", prot, "--input", str(out), "--no-progress", "--device", "cpu"]
    assert main([*args, "--report", str(notes)]) == 2
    assert notes.read_text() == '{"mine": true}\n' and "not a verify report" in capsys.readouterr().err
    report = tmp_path / "report.json"
    assert main([*args, "--report", str(report)]) == 0 and main([*args, "--report", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] is True
