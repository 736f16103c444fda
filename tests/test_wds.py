"""webdataset adapters: the resumable shard rewriter and the pipeline stage."""

from __future__ import annotations

import gzip
import io
import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import ue_datasets.apply.wds as uewds
from conftest import decode_display, encode, make_samples, png_pixels, read_tar, to_chw, write_shard
from ue_datasets import SampleError, SourceError, UEDatasetsError, fit_convolution, protect_batch
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards, protect_stage, write_samples

OTHER_FIELDS = ("cls", "json", "txt")


def protect(protection, inputs, out_dir, workers=1, overwrite=False, **options):
    opts = ShardOptions(device="cpu", **options)
    return protect_shards(protection, [str(u) for u in inputs], str(out_dir), opts, workers=workers,
                          overwrite=overwrite, progress=False)


def expected_pixels(protection, sample) -> torch.Tensor:
    """What the protected image must be: protect_batch on the decoded, EXIF-transposed input."""
    ext = "jpg" if "jpg" in sample else "png"
    img = decode_display(sample[ext]).convert("RGB")
    return protect_batch(protection, [to_chw(img)], labels=[int(sample["cls"])])[0]


def out_path(out_dir, in_url) -> str:
    return os.path.join(str(out_dir), os.path.basename(str(in_url)))


def file_bytes(url) -> bytes:
    with fsspec.open(str(url), "rb") as f:
        return f.read()


def listing(d) -> list[str]:
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# --------------------------------------------------------------------------- round trip


def test_rewritten_shards_keep_keys_order_and_other_fields_and_hold_protect_batch_pixels(shards, protection, tmp_path):
    out_dir = tmp_path / "out"
    stats = protect(protection, shards, out_dir)
    assert listing(out_dir) == sorted(
        [f"shard-{i:02d}.tar" for i in range(3)] + [f"shard-{i:02d}_stats.json" for i in range(3)]
    )
    for in_url, st in zip(shards, stats):
        src, dst = read_tar(in_url), read_tar(out_path(out_dir, in_url))
        assert [s["__key__"] for s in dst] == [s["__key__"] for s in src]
        for a, b in zip(src, dst):
            # Same fields in the same member order, the jpg replaced in place by a png.
            assert list(b) == [("png" if k == "jpg" else k) for k in a]
            for field in OTHER_FIELDS:
                assert b[field] == a[field]
            assert torch.equal(png_pixels(b["png"]), expected_pixels(protection, a))
            assert not torch.equal(png_pixels(b["png"]), to_chw(decode_display(a["jpg"]).convert("RGB")))
        # Names, never paths of the protector's machine.
        assert st["input"] == st["output"] == os.path.basename(in_url)
        assert (st["samples"], st["written"], st["protected"], st["skipped"]) == (5, 5, 5, [])
        assert st["resumed"] is False
        assert st["protection"] == {"method": "convolution", "id": protection.id}
        on_disk = json.loads((out_dir / (os.path.basename(in_url)[:-4] + "_stats.json")).read_text())
        assert on_disk == st


def test_exif_rotated_jpeg_is_protected_as_displayed(shards, protection, tmp_path):
    protect(protection, shards[:1], tmp_path / "out")
    src, dst = read_tar(shards[0])[1], read_tar(out_path(tmp_path / "out", shards[0]))[1]
    stored = Image.open(io.BytesIO(src["jpg"]))
    assert stored.size == (10, 12)  # stored 10 wide, 12 high; displayed rotated
    assert tuple(png_pixels(dst["png"]).shape) == (3, 10, 12)
    out = Image.open(io.BytesIO(dst["png"]))
    assert not out.getexif().get(0x0112)


def test_output_shards_are_readable_by_webdataset(shards, protection, tmp_path):
    protect(protection, shards, tmp_path / "out")
    for in_url in shards:
        url = out_path(tmp_path / "out", in_url)
        got = list(wds.WebDataset(url, shardshuffle=False))
        ours = read_tar(url)
        assert [s["__key__"] for s in got] == [s["__key__"] for s in ours]
        for g, o in zip(got, ours):
            for field in ("png", *OTHER_FIELDS):
                assert g[field] == o[field]
        decoded = list(wds.WebDataset(url, shardshuffle=False).decode("rgb8").to_tuple("png", "cls"))
        assert len(decoded) == 5
        assert all(isinstance(img, np.ndarray) and img.dtype == np.uint8 for img, _ in decoded)


def test_tar_gz_input_is_read_and_written_as_plain_tar(protection, tmp_path):
    buf = io.BytesIO()
    write_samples(buf, make_samples(3))
    gz = tmp_path / "shard.tar.gz"
    gz.write_bytes(gzip.compress(buf.getvalue()))
    stats = protect(protection, [gz], tmp_path / "out")
    assert (stats[0]["input"], stats[0]["output"]) == ("shard.tar.gz", "shard.tar")
    assert [s["__key__"] for s in read_tar(tmp_path / "out" / "shard.tar")] == [s["__key__"] for s in make_samples(3)]


def test_memory_urls_work_for_input_and_output(shards, protection, tmp_path):
    root = f"memory://ue-tests-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        inputs = [write_shard(f"{root}/in/{os.path.basename(s)}", read_tar(s)) for s in shards]
        stats = protect(protection, inputs, f"{root}/out")
        protect(protection, shards, tmp_path / "local")
        for in_url, local, st in zip(inputs, shards, stats):
            out_url = f"{root}/out/{os.path.basename(in_url)}"
            assert st["output"] == os.path.basename(in_url)
            assert file_bytes(out_url) == file_bytes(out_path(tmp_path / "local", local))
            assert fs.exists(out_url[: -len(".tar")] + "_stats.json")
        again = protect(protection, inputs, f"{root}/out")
        assert [s["resumed"] for s in again] == [True, True, True]
    finally:
        fs.rm(root.removeprefix("memory://"), recursive=True)


# --------------------------------------------------------------------------- resuming


def test_rerun_skips_completed_shards_without_touching_them(shards, protection, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    first = protect(protection, shards, out_dir)
    before = {n: (out_dir / n).read_bytes() for n in listing(out_dir)}

    def boom(*a, **k):
        raise AssertionError("a completed shard was protected again")

    monkeypatch.setattr(uewds, "protect_encoded_stream", boom)
    second = protect(protection, shards, out_dir)
    assert [s["resumed"] for s in second] == [True, True, True]
    assert [{**s, "resumed": False} for s in second] == first
    assert {n: (out_dir / n).read_bytes() for n in listing(out_dir)} == before


def test_rerun_with_another_protection_raises_unless_overwrite(shards, protection, other_protection, tmp_path):
    out_dir = tmp_path / "out"
    protect(protection, shards, out_dir)
    before = file_bytes(out_path(out_dir, shards[0]))
    with pytest.raises(UEDatasetsError, match="another protection"):
        protect(other_protection, shards, out_dir)
    assert file_bytes(out_path(out_dir, shards[0])) == before
    stats = protect(other_protection, shards, out_dir, overwrite=True)
    assert [s["resumed"] for s in stats] == [False] * 3
    assert all(s["protection"]["id"] == other_protection.id for s in stats)
    assert file_bytes(out_path(out_dir, shards[0])) != before
    dst = read_tar(out_path(out_dir, shards[0]))
    assert torch.equal(png_pixels(dst[0]["png"]), expected_pixels(other_protection, read_tar(shards[0])[0]))


def test_interrupted_run_leaves_no_partial_shard_and_resumes_to_identical_bytes(shards, protection, tmp_path, monkeypatch):
    real = uewds.protect_encoded_stream
    calls = []

    def interrupted(protection, batches, source, *rest, **kwargs):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(protection, batches, source, *rest, **kwargs)

    out_dir = tmp_path / "out"
    monkeypatch.setattr(uewds, "protect_encoded_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        protect(protection, shards, out_dir)
    assert calls == [shards[0], shards[1]]
    # Only the first shard is complete; the second left neither a file nor stats, not even a partial.
    assert listing(out_dir) == ["shard-00.tar", "shard-00_stats.json"]

    monkeypatch.setattr(uewds, "protect_encoded_stream", real)
    resumed = protect(protection, shards, out_dir)
    assert [s["resumed"] for s in resumed] == [True, False, False]

    clean = tmp_path / "clean"
    protect(protection, shards, clean)
    assert listing(out_dir) == listing(clean)
    for name in listing(clean):
        if name.endswith(".tar"):
            assert (out_dir / name).read_bytes() == (clean / name).read_bytes(), name


# --------------------------------------------------------------------------- determinism


def test_batch_size_does_not_change_the_output_bytes(protection, tmp_path):
    shard = write_shard(str(tmp_path / "big.tar"), make_samples(15, seed=7))
    outputs = []
    for bs in (1, 7, 64):
        protect(protection, [shard], tmp_path / f"bs{bs}", batch_size=bs)
        outputs.append((tmp_path / f"bs{bs}" / "big.tar").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow
def test_two_worker_processes_give_the_same_bytes_as_one(shards, protection, tmp_path):
    one = protect(protection, shards, tmp_path / "w1", workers=1)
    two = protect(protection, shards, tmp_path / "w2", workers=2)
    for in_url in shards:
        assert file_bytes(out_path(tmp_path / "w1", in_url)) == file_bytes(out_path(tmp_path / "w2", in_url))
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert [strip(s) for s in one] == [strip(s) for s in two]


def test_protect_stage_in_a_webdataset_pipeline_gives_the_rewriter_png_bytes(shards, protection, tmp_path):
    protect(protection, shards, tmp_path / "out")
    for in_url in shards:
        staged = list(wds.WebDataset(in_url, shardshuffle=False).compose(protect_stage(protection, device="cpu")))
        rewritten = read_tar(out_path(tmp_path / "out", in_url))
        assert [s["__key__"] for s in staged] == [s["__key__"] for s in rewritten]
        for s, r in zip(staged, rewritten):
            assert "jpg" not in s
            assert s["png"] == r["png"]
            for field in OTHER_FIELDS:
                assert s[field] == r[field]


def test_partial_protection_leaves_unselected_samples_unchanged(protection, tmp_path):
    half = fit_convolution(10, key=0, fraction=0.5)
    samples = make_samples(12, seed=9, fmt="png")
    shard = write_shard(str(tmp_path / "p.tar"), samples)
    stats = protect(half, [shard], tmp_path / "out")
    dst = read_tar(tmp_path / "out" / "p.tar")
    protected = 0
    for a, b in zip(samples, dst):
        got = png_pixels(b["png"])
        if torch.equal(got, expected_pixels(protection, a)):
            protected += 1
        else:
            assert torch.equal(got, png_pixels(a["png"]))
    assert stats[0]["protected"] == protected
    assert 0 < protected < 12


# --------------------------------------------------------------------------- bad input


def _sixteen_bit_png() -> bytes:
    img = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))
    assert img.mode == "I;16"
    return encode(img, "PNG")


def _break(kind: str, sample: dict) -> dict:
    sample = dict(sample)
    if kind == "undecodable":
        sample["jpg"] = b"\xff\xd8 this is not a jpeg at all"
    elif kind == "missing_label":
        del sample["cls"]
    elif kind == "label_out_of_range":
        sample["cls"] = b"12"
    elif kind == "negative_label":
        sample["cls"] = b"-1"
    elif kind == "non_integer_label":
        sample["cls"] = b"cat"
    elif kind == "sixteen_bit":
        del sample["jpg"]
        sample = {"__key__": sample["__key__"], "png": _sixteen_bit_png(),
                  **{k: v for k, v in sample.items() if k != "__key__"}}
    return sample


BAD_KINDS = {
    "undecodable": "cannot decode",
    "missing_label": "missing label",
    "label_out_of_range": "out of range",
    "negative_label": "out of range",
    "non_integer_label": "not an integer",
    "sixteen_bit": "I;16",
}


@pytest.fixture
def bad_shard(request, tmp_path):
    samples = make_samples(5, seed=4)
    samples[2] = _break(request.param, samples[2])
    url = write_shard(str(tmp_path / "bad.tar"), samples)
    return request.param, url, samples


@pytest.mark.parametrize("bad_shard", list(BAD_KINDS), indirect=True)
def test_bad_sample_fails_naming_shard_and_key_and_leaves_no_output(bad_shard, protection, tmp_path):
    kind, url, samples = bad_shard
    bad_key = samples[2]["__key__"]
    with pytest.raises(SampleError) as info:
        protect(protection, [url], tmp_path / "out")
    assert url in str(info.value) and bad_key in str(info.value)
    assert info.value.source == url and info.value.key == bad_key
    assert BAD_KINDS[kind] in info.value.reason
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("bad_shard", list(BAD_KINDS), indirect=True)
def test_bad_sample_is_skipped_and_recorded_with_on_error_skip(bad_shard, protection, tmp_path):
    kind, url, samples = bad_shard
    bad_key = samples[2]["__key__"]
    (stats,) = protect(protection, [url], tmp_path / "out", on_error="skip")
    assert len(stats["skipped"]) == 1
    assert stats["skipped"][0]["key"] == bad_key
    assert BAD_KINDS[kind] in stats["skipped"][0]["reason"]
    assert (stats["samples"], stats["written"], stats["protected"]) == (5, 4, 4)
    dst = read_tar(tmp_path / "out" / "bad.tar")
    good = [s for s in samples if s["__key__"] != bad_key]
    assert [s["__key__"] for s in dst] == [s["__key__"] for s in good]
    for a, b in zip(good, dst):
        assert torch.equal(png_pixels(b["png"]), expected_pixels(protection, a))


def _tar_and_member(samples: list[dict], name: str):
    """The tar bytes of ``samples`` and the `TarInfo` of member ``name`` (its offsets into the bytes)."""
    import tarfile

    buf = io.BytesIO()
    write_samples(buf, samples)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        return buf.getvalue(), tar.getmember(name)


def _truncated(tmp_path, cut_in_sample: int = 2) -> tuple[str, list[dict]]:
    """A 5-sample shard cut in the middle of the image data of sample ``cut_in_sample``."""
    samples = make_samples(5, seed=5)
    data, member = _tar_and_member(samples, f"{samples[cut_in_sample]['__key__']}.jpg")
    cut = member.offset_data + member.size // 2
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    return str(path), samples


def test_truncated_shard_fails_naming_shard_and_last_good_key(protection, tmp_path):
    url, samples = _truncated(tmp_path)
    with pytest.raises(SourceError) as info:
        protect(protection, [url], tmp_path / "out")
    msg = str(info.value)
    assert url in msg and "truncated" in msg
    assert any(repr(s["__key__"]) in msg for s in samples[:2])
    assert listing(tmp_path / "out") == []


def test_truncated_shard_with_skip_writes_the_samples_before_the_cut_and_records_it(protection, tmp_path):
    url, samples = _truncated(tmp_path)
    (stats,) = protect(protection, [url], tmp_path / "out", on_error="skip")
    dst = read_tar(tmp_path / "out" / "cut.tar")
    keys = [s["__key__"] for s in dst]
    assert keys and keys == [s["__key__"] for s in samples[: len(keys)]] and len(keys) < 5
    assert stats["written"] == stats["samples"] == len(keys)
    assert len(stats["skipped"]) == 1 and "truncated" in stats["skipped"][0]["reason"]
    # The record says where reading stopped: after the last sample written.
    assert repr(keys[-1]) in stats["skipped"][0]["reason"]


def test_truncated_shard_with_skip_keeps_every_complete_sample_before_the_cut(protection, tmp_path):
    url, samples = _truncated(tmp_path, cut_in_sample=2)
    protect(protection, [url], tmp_path / "out", on_error="skip")
    keys = [s["__key__"] for s in read_tar(tmp_path / "out" / "cut.tar")]
    assert keys == [s["__key__"] for s in samples[:2]]


def test_tar_cut_between_two_samples_is_reported_as_truncated(protection, tmp_path):
    samples = make_samples(4, seed=6)
    data, member = _tar_and_member(samples, f"{samples[2]['__key__']}.jpg")
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: member.offset])  # ends right before sample 2's first header
    with pytest.raises(SourceError, match="truncated"):
        protect(protection, [str(path)], tmp_path / "out")


def _empty_shard(tmp_path) -> str:
    return write_shard(str(tmp_path / "empty.tar"), [])


def test_empty_shard_fails_naming_the_shard(protection, tmp_path):
    url = _empty_shard(tmp_path)
    with pytest.raises(SourceError, match="empty") as info:
        protect(protection, [url], tmp_path / "out")
    assert url in str(info.value)
    assert listing(tmp_path / "out") == []


def test_empty_shard_with_skip_writes_an_empty_tar_and_records_it(protection, tmp_path):
    url = _empty_shard(tmp_path)
    (stats,) = protect(protection, [url], tmp_path / "out", on_error="skip")
    assert stats["written"] == 0 and stats["samples"] == 0
    assert len(stats["skipped"]) == 1 and "empty" in stats["skipped"][0]["reason"]
    assert read_tar(tmp_path / "out" / "empty.tar") == []


def test_zero_byte_file_is_an_unreadable_shard(protection, tmp_path):
    path = tmp_path / "zero.tar"
    path.write_bytes(b"")
    with pytest.raises(SourceError) as info:
        protect(protection, [str(path)], tmp_path / "out")
    assert str(path) in str(info.value)


def test_missing_input_shard_raises_source_error(protection, tmp_path):
    with pytest.raises(SourceError):
        protect(protection, [str(tmp_path / "nope.tar")], tmp_path / "out")


def test_two_inputs_with_the_same_name_are_refused(protection, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    s = make_samples(1)
    urls = [write_shard(str(tmp_path / d / "x.tar"), s) for d in ("a", "b")]
    with pytest.raises(UEDatasetsError, match="both be written"):
        protect(protection, urls, tmp_path / "out")


def test_stage_fails_on_a_bad_sample_and_skips_it_with_a_warning(protection, tmp_path):
    samples = make_samples(3, seed=8)
    samples[1] = _break("label_out_of_range", samples[1])
    url = write_shard(str(tmp_path / "s.tar"), samples)
    with pytest.raises(SampleError, match=samples[1]["__key__"]):
        list(wds.WebDataset(url, shardshuffle=False).compose(protect_stage(protection, device="cpu")))
    with pytest.warns(UserWarning, match=samples[1]["__key__"]):
        out = list(wds.WebDataset(url, shardshuffle=False).compose(
            protect_stage(protection, device="cpu", on_error="skip")))
    assert [s["__key__"] for s in out] == [samples[0]["__key__"], samples[2]["__key__"]]
