"""No clean image is published, no sample is lost for another's fault, nothing is silently reduced.

Every image field of a sample is protected or the sample fails; a bad sample is skipped alone and
named; declared sizes, bit depths and frame counts are checked before decoding; every other field,
``__``-prefixed ones included, is kept byte for byte.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from conftest import encode, make_samples, png_pixels, read_tar, to_chw, write_shard
from ue_datasets import SampleError, protect_batch
from ue_datasets.apply.images import ImageFormatError, decode, decode_with_profile
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards, read_samples

RNG = np.random.default_rng(5)


def _rgb(h=8, w=8) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _protect(protection, tmp_path, samples, **options):
    shard = write_shard(tmp_path / "in.tar", samples)
    (stats,) = protect_shards(protection, [shard], str(tmp_path / "out"), ShardOptions(device="cpu", **options),
                              progress=False)
    return stats, read_tar(tmp_path / "out" / "in.tar")


def _expected(protection, data: bytes, label: int) -> torch.Tensor:
    return protect_batch(protection, [to_chw(Image.open(io.BytesIO(data)).convert("RGB"))], labels=[label])[0]


# --------------------------------------------------------------------------- every image is protected


@pytest.mark.parametrize("names", [
    {"png": "png", "jpg": "jpg.png"},
    {"jpg": "png", "webp": "webp.png"},
    {"left.jpg": "left.png", "right.jpg": "right.png"},
    {"gif": "png"},
], ids=["png+jpg", "jpg+webp", "left+right", "gif"])
def test_every_image_field_of_a_sample_is_protected(protection, tmp_path, names):
    formats = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
    images = {f: encode(_rgb().convert("P").convert("RGB") if f == "gif" else _rgb(), formats[f.rsplit(".", 1)[-1]])
              for f in names}
    sample = {"__key__": "k0", **images, "cls": b"3", "txt": b"caption"}
    stats, (out,) = _protect(protection, tmp_path, [sample])
    assert stats["written"] == 1 and stats["skipped"] == []
    assert sorted(out) == sorted(["__key__", "cls", "txt", *names.values()])
    for src, name in names.items():
        assert out[name] not in images.values()
        assert torch.equal(png_pixels(out[name]), _expected(protection, images[src], 3)), (src, name)
    assert out["txt"] == b"caption" and out["cls"] == b"3"


def test_png_and_jpg_fields_are_written_as_png_and_jpg_png(protection, tmp_path):
    sample = {"__key__": "k0", "jpg": encode(_rgb(), "JPEG"), "png": encode(_rgb()), "cls": b"1"}
    _, (out,) = _protect(protection, tmp_path, [sample])
    assert list(out) == ["__key__", "jpg.png", "png", "cls"]
    assert torch.equal(png_pixels(out["jpg.png"]), _expected(protection, sample["jpg"], 1))
    assert torch.equal(png_pixels(out["png"]), _expected(protection, sample["png"], 1))


@pytest.mark.parametrize("field,data,reason", [
    ("avif", b"\x00\x00\x00\x1cftypavif" + b"\x00" * 32, "avif images are not read"),
    ("bin", encode(_rgb()), "holds image data but is not named as an image"),
])
def test_an_image_that_cannot_be_protected_fails_its_sample_and_skip_records_it(protection, tmp_path, field, data,
                                                                                 reason):
    samples = make_samples(3, fmt="png")
    samples[1][field] = data
    with pytest.raises(SampleError, match=reason):
        _protect(protection, tmp_path, samples)
    stats, out = _protect(protection, tmp_path, samples, on_error="skip")
    assert [s["__key__"] for s in out] == [samples[0]["__key__"], samples[2]["__key__"]]
    assert stats["skipped"][0]["key"] == samples[1]["__key__"] and reason in stats["skipped"][0]["reason"]


def test_keep_fields_given_as_one_string_name_one_field():
    assert ShardOptions(keep_fields="mask.png").keep_fields == ("mask.png",)


def test_keep_fields_publish_a_named_image_field_unprotected(protection, tmp_path):
    samples = make_samples(2, fmt="jpg")
    mask = encode(Image.fromarray(np.eye(8, dtype=np.uint8) * 255, "L"))
    for s in samples:
        s["mask.png"] = mask
    _, out = _protect(protection, tmp_path, samples, keep_fields=("mask.png",))
    assert all(s["mask.png"] == mask for s in out) and all("png" in s for s in out)


# --------------------------------------------------------------------------- a bad sample is skipped alone


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_duplicate_field_skips_only_its_sample_and_names_it(protection, tmp_path):
    samples = make_samples(4, fmt="png")
    members = []
    for i, s in enumerate(samples):
        members += [(f"{s['__key__']}.png", s["png"]), (f"{s['__key__']}.cls", s["cls"])]
        if i == 1:
            members.append((f"{s['__key__']}.cls", b"7"))
    (tmp_path / "dup.tar").write_bytes(_tar(members))
    (stats,) = protect_shards(protection, [str(tmp_path / "dup.tar")], str(tmp_path / "out"),
                              ShardOptions(device="cpu", on_error="skip"), progress=False)
    assert [s["__key__"] for s in read_tar(tmp_path / "out" / "dup.tar")] == [
        samples[i]["__key__"] for i in (0, 2, 3)]
    assert stats["skipped"] == [{"key": samples[1]["__key__"], "reason": "duplicate field 'cls'"}]


def test_a_field_named_like_metadata_or_a_repeated_key_fails_that_sample_only(tmp_path):
    members = [("a.png", b"1"), ("a.__key__", b"evil"), ("b.png", b"2"), ("a.png", b"3"), ("c.png", b"4")]
    got = list(read_samples(io.BytesIO(_tar(members)), "t.tar"))
    assert [type(s).__name__ if isinstance(s, SampleError) else s["__key__"] for s in got] == [
        "SampleError", "b", "SampleError", "c"]
    assert "metadata entry" in got[0].reason and "not contiguous" in got[2].reason


# --------------------------------------------------------------------------- declared size, depth, frames


def test_a_declared_size_bomb_is_refused_before_decoding(protection, tmp_path):
    buf = io.BytesIO()
    Image.new("L", (13000, 13000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(ImageFormatError, match="13000 x 13000"):
        decode(buf.getvalue())
    samples = make_samples(2, fmt="png")
    samples[0]["png"] = buf.getvalue()
    stats, out = _protect(protection, tmp_path, samples, on_error="skip")
    assert len(out) == 1 and "above the limit" in stats["skipped"][0]["reason"]
    with pytest.raises(ImageFormatError, match="above the limit of 63"):
        decode(encode(_rgb()), max_pixels=63)


def _bmp565() -> tuple[bytes, np.ndarray]:
    pix = struct.pack("<4H", 0xF800, 0x07E0, 0x001F, 0xFFFF)  # bottom row first: red, green / blue, white
    header = struct.pack("<IiiHHIIiiII", 40, 2, 2, 1, 16, 3, len(pix), 2835, 2835, 0, 0)
    masks = struct.pack("<3I", 0xF800, 0x07E0, 0x001F)
    offset = 14 + 40 + 12
    data = b"BM" + struct.pack("<IHHI", offset + len(pix), 0, 0, offset) + header + masks + pix
    return data, np.array([[[0, 0, 255], [255, 255, 255]], [[255, 0, 0], [0, 255, 0]]], dtype=np.uint8)


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (0, 120, 240)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("data,reason", [
    (b"P6\n2 2\n65535\n" + struct.pack(">12H", *[4660] * 12), "more than 8 bits"),
    (b"P5\n2 2\n1023\n" + struct.pack(">4H", *[400] * 4), "more than 8 bits"),
    (_animated("TIFF"), "3 frames"),
    (_animated("PNG"), "3 frames"),
    (_animated("WEBP"), "3 frames"),
    (_animated("GIF"), "3 frames"),
], ids=["ppm16", "pgm10", "tiff-pages", "apng", "webp-animated", "gif-animated"])
def test_deep_or_multi_frame_images_are_refused_not_reduced(data, reason):
    with pytest.raises(ImageFormatError, match=reason):
        decode(data)


def test_a_16_bpp_bmp_is_an_8_bit_image_and_is_accepted():
    data, expected = _bmp565()
    assert np.array_equal(np.asarray(decode(data)), expected)


def test_an_rgb_icc_profile_is_kept_in_the_protected_png(protection, tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    _rgb().save(buf, "PNG", icc_profile=profile)
    assert decode_with_profile(buf.getvalue()).icc_profile == profile
    _, (out,) = _protect(protection, tmp_path, [{"__key__": "k", "png": buf.getvalue(), "cls": b"2"}])
    assert Image.open(io.BytesIO(out["png"])).info.get("icc_profile") == profile
    cmyk = io.BytesIO()
    _rgb().convert("CMYK").save(cmyk, "JPEG", icc_profile=profile)  # an RGB profile on CMYK pixels: dropped
    assert decode_with_profile(cmyk.getvalue()).icc_profile is None


# --------------------------------------------------------------------------- fields kept


def test_double_underscore_fields_are_kept_byte_for_byte(protection, tmp_path):
    samples = make_samples(2, fmt="png")
    for s in samples:
        s["__meta__"] = b"\x00secret-ish bytes"
        s["__x"] = b"y"
    _, out = _protect(protection, tmp_path, samples)
    assert [(s["__meta__"], s["__x"]) for s in out] == [(b"\x00secret-ish bytes", b"y")] * 2


# --------------------------------------------------------------------------- datasets num_proc


@pytest.mark.slow
def test_datasets_num_proc_2_works_after_torch_ran_in_the_parent(tmp_path):
    script = textwrap.dedent("""
        import io, sys
        import datasets, numpy as np
        from PIL import Image
        from ue_datasets import fit_convolution
        from ue_datasets.apply.hf import protect_dataset
        p = fit_convolution(10, key=0)
        rng = np.random.default_rng(0)
        def enc(a):
            b = io.BytesIO(); Image.fromarray(a).save(b, "PNG"); return {"bytes": b.getvalue(), "path": None}
        ds = datasets.Dataset.from_dict(
            {"image": [enc(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(32)],
             "label": [i % 10 for i in range(32)]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
        one = protect_dataset(ds, p, device="cpu", batch_size=32)   # torch's thread pool now runs here
        two = protect_dataset(ds, p, device="cpu", num_proc=2, batch_size=8)
        assert [r["bytes"] for r in one.cast_column("image", datasets.Image(decode=False))["image"]] == \\
            [r["bytes"] for r in two.cast_column("image", datasets.Image(decode=False))["image"]]
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the parent must have a thread pool for the bug to show
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# --------------------------------------------------------------------------- images hidden elsewhere


def _ppm(h=4, w=4) -> bytes:
    return f"P6\n{w} {h}\n255\n".encode() + RNG.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes()


@pytest.mark.parametrize("field,data", [
    ("seg.png.gz", __import__("gzip").compress(encode(_rgb()))),
    ("bin", encode(_rgb(), "BMP")),
    ("blob", encode(_rgb(200, 200), "BMP")),
    ("dat", _ppm()),
    ("__meta__", encode(_rgb())),
], ids=["gzipped-png", "bmp-bytes", "large-bmp-bytes", "ppm-bytes", "dunder-field"])
def test_images_hidden_in_other_fields_fail_their_sample(protection, tmp_path, field, data):
    samples = make_samples(2, fmt="png")
    samples[0][field] = data
    stats, out = _protect(protection, tmp_path, samples, on_error="skip")
    assert [s["__key__"] for s in out] == [samples[1]["__key__"]]
    assert stats["skipped"][0]["key"] == samples[0]["__key__"]


def _planar_tiff16() -> bytes:
    """An 8 x 8 RGB TIFF, 16 bits per sample, planar configuration 2 (Pillow unpacks it band by band)."""
    data = RNG.integers(0, 65535, (3, 8, 8), dtype=np.uint16).astype("<u2").tobytes()
    bps = struct.pack("<3H", 16, 16, 16)
    off_data = 8 + len(bps)
    entries = sorted([(256, 4, 1, 8), (257, 4, 1, 8), (258, 3, 3, 8), (259, 3, 1, 1), (262, 3, 1, 2),
                      (273, 4, 1, off_data), (277, 3, 1, 3), (278, 4, 1, 8), (279, 4, 1, len(data)), (284, 3, 1, 2)])
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", off_data + len(data)) + bps + data + ifd


def test_a_planar_16_bit_tiff_is_refused_not_reduced():
    with pytest.raises(ImageFormatError, match="more than 8 bits"):
        decode(_planar_tiff16())


def test_parquet_images_in_other_columns_fail_their_row_or_the_file(protection, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ue_datasets import SourceError
    from ue_datasets.apply.parquet import protect_parquet

    images = [encode(_rgb()) for _ in range(3)]
    options = ShardOptions(label_field="label", image_field="image", device="cpu", on_error="skip")

    def run(name, **columns):
        (stats,) = protect_parquet(protection, [str(tmp_path / name)], str(tmp_path / "out"), options, progress=False)
        return stats

    blobs = [b"npy bytes", encode(_rgb()), b"more"]
    pq.write_table(pa.table({"image": images, "label": [1, 2, 3], "extra": blobs}), tmp_path / "a.parquet")
    stats = run("a.parquet")
    assert stats["written"] == 2 and stats["skipped"][0]["key"] == "1" and "'extra'" in stats["skipped"][0]["reason"]
    views = pa.array([[{"bytes": im, "path": None}] for im in images])  # images nested in lists of structs
    pq.write_table(pa.table({"image": images, "label": [1, 2, 3], "views": views}), tmp_path / "b.parquet")
    assert run("b.parquet")["written"] == 0
    declared = pa.table({"image": images, "label": [1, 2, 3], "mask": images}).replace_schema_metadata({
        "huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "mask": {"_type": "Image"}}}})})
    pq.write_table(declared, tmp_path / "c.parquet")
    with pytest.raises(SourceError, match="'mask' hold images too"):
        run("c.parquet")
    assert not (tmp_path / "out" / "c.parquet").exists()
    audio = pa.table({"image": images, "label": [1, 2, 3], "audio": [{"bytes": b"RIFF....WAVEfmt ", "path": None}] * 3})
    pq.write_table(audio.replace_schema_metadata({"huggingface": json.dumps(
        {"info": {"features": {"image": {"_type": "Image"}, "audio": {"_type": "Audio"}}}})}), tmp_path / "d.parquet")
    assert run("d.parquet")["written"] == 3  # {bytes, path} structs of audio are not images


def test_datasets_images_in_other_columns_are_refused_or_fail_their_row(protection):
    import datasets

    from ue_datasets import UEDatasetsError
    from ue_datasets.apply.hf import protect_dataset

    rows = [{"bytes": encode(_rgb()), "path": None} for _ in range(3)]
    nested = datasets.Dataset.from_dict(
        {"image": rows, "label": [0, 1, 2], "views": [[r] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "views": datasets.Sequence(datasets.Image())}))
    with pytest.raises(UEDatasetsError, match="'views' hold images too"):
        protect_dataset(nested, protection, device="cpu")
    assert len(protect_dataset(nested, protection, device="cpu", keep_columns=["views"])) == 3
    binary = datasets.Dataset.from_dict(
        {"image": rows, "label": [0, 1, 2], "blob": [b"x", encode(_rgb()), b"y"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "blob": datasets.Value("binary")}))
    skipped: list = []
    out = protect_dataset(binary, protection, device="cpu", on_error="skip", skipped=skipped)
    assert len(out) == 2 and [s["key"] for s in skipped] == ["1"] and "'blob'" in skipped[0]["reason"]


@pytest.mark.parametrize("data", [
    b"P3 10 20 apples on a table", b"P1 2 3 go", b"P2" + b" " * 60 + b"(padded caption)",
    np.array([2815, 13, 99], np.int32).tobytes(), b"II*\x00\xff\xff\xff\xff", b"BM is not a bitmap header",
], ids=["ppm-like-text", "pbm-like-text", "padded-text", "int32-ids", "tiff-like-bytes", "bm-text"])
def test_ordinary_fields_that_start_like_an_image_are_kept(protection, tmp_path, data):
    import signal

    signal.alarm(20)  # a backtracking header check would hang here
    try:
        samples = make_samples(2, fmt="png")
        samples[0]["txt"] = data
        stats, out = _protect(protection, tmp_path, samples)
    finally:
        signal.alarm(0)
    assert stats["skipped"] == [] and out[0]["txt"] == data


def test_datasets_path_only_images_are_read_from_local_files_only(protection, tmp_path):
    import datasets

    from ue_datasets.apply.hf import protect_dataset

    (tmp_path / "a.png").write_bytes(encode(_rgb()))
    rows = [{"bytes": None, "path": str(tmp_path / "a.png")}, {"bytes": None, "path": str(tmp_path / "gone.png")},
            {"bytes": None, "path": "http://example.invalid/x.png"}]
    ds = datasets.Dataset.from_dict({"image": rows, "label": [1, 2, 3]},
                                    features=datasets.Features({"image": datasets.Image(decode=False),
                                                                "label": datasets.Value("int64")}))
    skipped: list = []
    out = protect_dataset(ds, protection, device="cpu", on_error="skip", skipped=skipped)
    assert len(out) == 1 and [s["key"] for s in skipped] == ["1", "2"]
    assert "cannot read the image file" in skipped[0]["reason"] and "not fetched" in skipped[1]["reason"]
