"""The one-call Python API (`ue_datasets.protect`, `ue_datasets.fit`), several inputs, the skip threshold,
and a start-up that imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ue_datasets
from ue_datasets.errors import UEDatasetsError

from conftest import encode, make_dataset, make_samples, protect_cli, write_shard


def _parquet(path, n=6, seed=0):
    images, labels = make_dataset(n, seed)
    pq.write_table(pa.table({"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels}),
                   str(path))
    return str(path)


def test_fit_by_name_equals_the_method_function_and_saves(tmp_path):
    p = ue_datasets.fit("cuda", num_classes=10, key=7, output=tmp_path / "p")
    q = ue_datasets.fit_convolution(10, 7)
    assert p.method == "convolution" and (p.tensors["filters"] == q.tensors["filters"]).all()
    assert ue_datasets.load_protection(tmp_path / "p").id == p.id
    assert ue_datasets.fit.fit_convolution is ue_datasets.fit_convolution  # still the subpackage too


def test_fit_with_an_unknown_method_names_the_known_ones():
    with pytest.raises(UEDatasetsError, match="clusters, convolution, cuda, em, salm, t2ue, uge"):
        ue_datasets.fit("ntga", num_classes=10)


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf"])
def test_protect_takes_every_source_kind_and_an_artifact_path(tmp_path, prot, dataset_dir, kind):
    if kind == "wds":
        src = write_shard(str(tmp_path / "in" / "a.tar"), make_samples(4))
        dst = str(tmp_path / "out")
    elif kind == "parquet":
        (tmp_path / "pq").mkdir()
        src, dst = _parquet(tmp_path / "pq" / "a.parquet"), str(tmp_path / "out")
    else:
        src, dst = str(dataset_dir), str(tmp_path / "out_ds")
    result = ue_datasets.protect(src, dst, prot, device="cpu", progress=False)
    assert result.kind == kind and result.samples == result.written == result.protected > 0
    assert not result.skipped and result.summary().startswith(f"protected {result.written} of {result.samples}")
    again = ue_datasets.protect(src, dst, prot, device="cpu", progress=False)
    assert again.resumed == len(again.files) == len(result.files)


def test_protect_takes_several_inputs_and_refuses_overlapping_ones(tmp_path, prot):
    a = write_shard(str(tmp_path / "a" / "x.tar"), make_samples(3, seed=0))
    b = write_shard(str(tmp_path / "b" / "y.tar"), make_samples(3, seed=1))
    result = ue_datasets.protect([a, str(tmp_path / "b")], str(tmp_path / "out"), prot, device="cpu",
                                 progress=False)
    assert [f["output"] for f in result.files] == ["x.tar", "y.tar"] and result.samples == 6
    with pytest.raises(UEDatasetsError, match="given twice"):
        ue_datasets.protect([b, str(tmp_path / "b" / "*.tar")], str(tmp_path / "out2"), prot, device="cpu",
                            progress=False)


def test_cli_input_takes_the_files_an_unquoted_glob_expanded_to(tmp_path, prot):
    (tmp_path / "pq").mkdir()
    files = [_parquet(tmp_path / "pq" / f"{i}.parquet", seed=i) for i in range(3)]
    assert protect_cli("--protection", prot, "--input", *files, "--output", str(tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["0.parquet", "1.parquet", "2.parquet"]


def test_a_glob_split_by_the_shell_on_a_one_value_option_is_explained(tmp_path, capsys):
    from ue_datasets.cli import main

    files = [str(tmp_path / f"{i}.tar") for i in range(3)]
    for f in files:
        write_shard(f, make_samples(1))
    with pytest.raises(SystemExit):
        main(["audit", "--protected", *files, "--test", files[0], "-o", str(tmp_path / "r")])
    assert "the shell expanded an unquoted pattern" in capsys.readouterr().err


def _labelled_shard(path, labels):
    samples = make_samples(len(labels))
    for s, label in zip(samples, labels):
        s["cls"] = str(label).encode()
    return write_shard(path, samples)


def test_skipping_more_than_the_threshold_commits_but_exits_1_with_the_top_reasons(tmp_path, prot, capsys):
    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0, 1, 12, 12, 13, 2, 3, 4, 5, 6])
    out = tmp_path / "out"
    code = protect_cli("--protection", prot, "--input", src, "--output", str(out), "--on-error", "skip")
    err = capsys.readouterr().err
    assert code == 1
    assert "3 of 10 samples were skipped, more than the 0 allowed" in err
    assert "3 x label 12 is out of range [0, 10) (or alike)" in err
    stats = json.loads((out / "a_stats.json").read_text())  # written, and resumable
    assert (out / "a.tar").is_file() and stats["written"] == 7 and len(stats["skipped"]) == 3


def test_skipping_within_the_threshold_exits_0(tmp_path, prot):
    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0, 1, 12, 3])
    assert protect_cli("--protection", prot, "--input", src, "--output", str(tmp_path / "o1"),
                       "--on-error", "skip", "--max-skipped", "1") == 0
    assert protect_cli("--protection", prot, "--input", src, "--output", str(tmp_path / "o2"),
                       "--on-error", "skip", "--max-skipped", "25%") == 0


def test_the_python_api_raises_too_many_skipped_with_the_result(tmp_path, prot):
    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0, 12])
    with pytest.raises(ue_datasets.TooManySkipped) as info:
        ue_datasets.protect(src, str(tmp_path / "out"), prot, on_error="skip", device="cpu", progress=False)
    assert info.value.result.written == 1 and info.value.result.skip_reasons() == [
        ("label 12 is out of range [0, 10)", 1)]


@pytest.mark.parametrize("bad", ["-1", "x", "101%", -1, 1.5])
def test_a_bad_max_skipped_fails_before_any_work(tmp_path, prot, bad):
    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0])
    with pytest.raises(UEDatasetsError, match="max_skipped"):
        ue_datasets.protect(src, str(tmp_path / "out"), prot, max_skipped=bad, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cli_defaults_are_the_librarys():
    from ue_datasets import cli_parser as cli
    from ue_datasets.apply import protect, shards

    assert cli.DEFAULT_MAX_SKIPPED == protect.DEFAULT_MAX_SKIPPED
    assert cli.DEFAULT_BATCH_SIZE == shards.DEFAULT_BATCH_SIZE


HEAVY = ("torch", "datasets", "open_clip", "matplotlib", "pyarrow", "PIL", "webdataset", "fsspec")


@pytest.mark.parametrize("command", [[], ["fit", "cuda"], ["fit", "clusters"], ["protect"], ["audit"],
                                     ["inspect"], ["demo"], ["verify"]])
def test_help_imports_no_heavy_module(command):
    code = ("import sys\nfrom ue_datasets.cli import main\ntry:\n    main([*sys.argv[1:], '--help'])\n"
            "except SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_import_ue_datasets_imports_no_heavy_module_until_a_name_is_used():
    code = ("import sys, ue_datasets\nprint(any(m in sys.modules for m in ('torch', 'datasets')))\n"
            "ue_datasets.Protection\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_skip_reasons_group_reasons_that_differ_only_in_values(tmp_path, prot):
    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0, 12, 13, 13, 11, "x"])
    with pytest.raises(ue_datasets.TooManySkipped) as info:
        ue_datasets.protect(src, str(tmp_path / "out"), prot, on_error="skip", device="cpu", progress=False)
    assert info.value.result.skip_reasons() == [("label 12 is out of range [0, 10)", 4),
                                               ("label field 'cls' is not an integer: b'x'", 1)]
    assert "4 x label 12 is out of range [0, 10) (or alike)" in str(info.value)


def test_too_many_skipped_survives_pickling(tmp_path, prot):
    import pickle

    src = _labelled_shard(str(tmp_path / "in" / "a.tar"), [0, 12])
    with pytest.raises(ue_datasets.TooManySkipped) as info:
        ue_datasets.protect(src, str(tmp_path / "out"), prot, on_error="skip", device="cpu", progress=False)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.result.written == 1


def test_protect_takes_paths_as_well_as_strings(tmp_path, prot):
    write_shard(str(tmp_path / "in" / "a.tar"), make_samples(2))
    assert ue_datasets.protect(tmp_path / "in", tmp_path / "out", prot, device="cpu", progress=False).written == 2
    assert ue_datasets.protect([tmp_path / "in" / "a.tar"], tmp_path / "out2", prot, device="cpu",
                               progress=False).written == 2


@pytest.mark.parametrize("name", ["single.tar", "out.parquet/"])
def test_an_output_named_like_a_file_is_refused_as_not_a_folder(tmp_path, prot, name):
    src = write_shard(str(tmp_path / "in" / "a.tar"), make_samples(1))
    with pytest.raises(UEDatasetsError, match="the output is a folder"):
        ue_datasets.protect(src, str(tmp_path / name), prot, device="cpu", progress=False)
    assert not (tmp_path / name).exists()


def test_protecting_an_output_of_ue_datasets_again_warns(tmp_path, prot):
    src = write_shard(str(tmp_path / "in" / "a.tar"), make_samples(2))
    ue_datasets.protect(src, str(tmp_path / "once"), prot, device="cpu", progress=False)
    with pytest.warns(UserWarning, match="itself an output of ue-datasets"):
        ue_datasets.protect(str(tmp_path / "once"), str(tmp_path / "twice"), prot, device="cpu", progress=False)


def test_a_mistyped_artifact_directory_is_named_as_missing(tmp_path, capsys):
    from ue_datasets.cli import main

    assert main(["inspect", str(tmp_path / "my-protecton")]) == 2
    assert "no such artifact directory" in capsys.readouterr().err


def test_cli_warnings_are_one_line_of_their_own(tmp_path, prot, capsys):
    src = write_shard(str(tmp_path / "in" / "a.tar"), make_samples(2))
    assert protect_cli("--protection", prot, "--input", src, "--output", str(tmp_path / "once")) == 0
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "once"), "--output", str(tmp_path / "two")) == 0
    err = capsys.readouterr().err
    assert "ue-datasets: warning: " in err and "UserWarning" not in err
