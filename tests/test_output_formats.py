"""``--format png|webp|jpeg:Q``: every writer, the resume settings, the lossy warning, audit's ``publish:``
defences and verify on lossless and lossy outputs."""

from __future__ import annotations

import io
import json
import warnings

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import encode, make_dataset, make_samples, protect_cli, read_tar, restat_shard, write_shard
from PIL import Image, ImageCms, JpegImagePlugin

from ue_datasets import SampleError, UEDatasetsError, protect, protect_batch
from ue_datasets.apply.hf import ProtectMap, protect_dataset
from ue_datasets.apply.images import LossyOutputWarning, OutputFormat, encode_png, image_tensor
from ue_datasets.apply.parquet import protect_parquet
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.verify import psnr, verify
from ue_datasets.apply.wds import output_names, protect_samples, protect_shards, protect_stage
from ue_datasets.audit.defenses import jpeg, parse_defense, publish

FORMATS = ["png", "webp", "jpeg:90"]
#: What JPEG at quality 90 keeps of the protected pixels of the tests' random-noise images (noise is
#: JPEG's worst case: measured at least 29 dB and at most 43 levels off over 36 such images).
JPEG90_MIN_PSNR = 25.0
JPEG90_MAX_DIFF = 64
MAGIC = {"png": b"\x89PNG", "webp": b"RIFF", "jpeg:90": b"\xff\xd8\xff"}
#: The settings a default (PNG) output records, exactly as before formats existed.
LEGACY_SETTINGS = {"label_field": "cls", "image_field": None, "key_field": None, "keep_fields": [], "on_error": "fail",
                   "png_level": 1, "max_pixels": 100_000_000, "unfitted": "error"}


def opts(fmt: str, **kw) -> ShardOptions:
    return ShardOptions(device="cpu", format=fmt, **kw)


def expected(protection, data: bytes, label: int) -> torch.Tensor:
    """The protection of encoded ``data`` as `protect_batch` gives it."""
    return protect_batch(protection, image_tensor(data)[None], [label])[0]


def check_pixels(fmt: str, written: bytes, exp: torch.Tensor) -> None:
    """Lossless: exactly ``exp``. JPEG: exactly ``exp`` as the format encodes it, and within the tolerance."""
    assert written.startswith(MAGIC[fmt])
    got = image_tensor(written)
    if OutputFormat.parse(fmt).lossless:
        assert torch.equal(got, exp)
        return
    assert torch.equal(got, image_tensor(OutputFormat.parse(fmt).encode(exp)))
    assert psnr(got, exp) > JPEG90_MIN_PSNR and int((got.int() - exp.int()).abs().max()) <= JPEG90_MAX_DIFF


def lossy_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, LossyOutputWarning)]


# ------------------------------------------------------------------------------------------ the format


@pytest.mark.parametrize("spec, canonical, extension, lossless", [
    ("png", "png", "png", True), ("PNG", "png", "png", True), (" webp ", "webp", "webp", True),
    ("jpeg:90", "jpeg:90", "jpg", False), ("JPEG:95", "jpeg:95", "jpg", False), ("jpg:1", "jpeg:1", "jpg", False),
    ("jpeg:100", "jpeg:100", "jpg", False),
])
def test_specs_parse_to_canonical_formats(spec, canonical, extension, lossless):
    f = OutputFormat.parse(spec)
    assert (f.spec, f.extension, f.lossless) == (canonical, extension, lossless)
    assert OutputFormat.parse(f.spec) == f and OutputFormat.parse(f) is f


@pytest.mark.parametrize("spec, message", [
    ("jpeg", "needs its quality"), ("jpeg:", "needs its quality"), ("jpeg:0", "1..100"), ("jpeg:101", "1..100"),
    ("jpeg:9x", "1..100"), ("jpeg:-5", "1..100"), ("png:6", "takes no parameter"), ("webp:80", "takes no parameter"),
    ("gif", "unknown output format"), ("", "unknown output format"), ("tiff", "unknown output format"),
])
def test_bad_specs_fail_naming_the_valid_ones(spec, message):
    with pytest.raises(UEDatasetsError, match=message) as e:
        OutputFormat.parse(spec)
    assert "png (lossless, default), webp (lossless), jpeg:Q" in str(e.value)


def test_bad_formats_fail_before_any_work(tmp_path, protection, shards):
    with pytest.raises(UEDatasetsError, match="unknown output format"):
        ShardOptions(format="bmp")
    with pytest.raises(UEDatasetsError, match="needs its quality"):
        protect(str(tmp_path / "in"), str(tmp_path / "out"), protection, format="jpeg", progress=False)
    assert not (tmp_path / "out").exists()


def _rgb(seed=0, shape=(12, 10, 3)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).permute(2, 0, 1)


def test_png_bytes_are_those_of_before():
    t = _rgb()
    assert OutputFormat().encode(t) == encode_png(t) == OutputFormat.parse("png").encode(t)
    assert OutputFormat.parse("png", png_level=6).encode(t) == encode_png(t, 6)


def test_webp_is_exactly_lossless_for_rgb_and_rgba_even_under_full_transparency():
    rgba = _rgb(1, (16, 16, 4))
    rgba[3, :8] = 0  # colours under fully transparent pixels must survive too (libwebp drops them without exact)
    for t in (_rgb(), rgba):
        data = OutputFormat.parse("webp").encode(t)
        assert data[8:12] == b"WEBP" and torch.equal(image_tensor(data), t)


def test_jpeg_is_4_4_4_at_its_quality_and_keeps_grayscale_as_one_channel():
    data = OutputFormat.parse("jpeg:90").encode(_rgb())
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and JpegImagePlugin.get_sampling(img) == 0  # no chroma subsampling
    low = OutputFormat.parse("jpeg:20").encode(_rgb())
    assert len(low) < len(data)
    gray = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 12, 10), dtype=np.uint8))
    assert image_tensor(OutputFormat.parse("jpeg:90").encode(gray)).shape == (1, 12, 10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_keeps_the_icc_profile(fmt):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = OutputFormat.parse(fmt).encode(_rgb(), icc)
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") == icc


@pytest.mark.parametrize("fmt, channels, message", [
    ("webp", 1, "WebP has no grayscale mode"), ("webp", 2, "WebP has no grayscale mode"),
    ("jpeg:90", 2, "JPEG holds no alpha"), ("jpeg:90", 4, "JPEG holds no alpha"),
])
def test_modes_a_format_cannot_read_back_are_refused(fmt, channels, message):
    t = torch.zeros((channels, 4, 4), dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match=message):
        OutputFormat.parse(fmt).encode(t)


def test_sides_above_webps_limit_are_refused():
    assert "at most 16383" in OutputFormat.parse("webp").refusal(3, (16384, 8))
    assert OutputFormat.parse("png").refusal(3, (16384, 8)) is None


# ------------------------------------------------------------------------------------------ webdataset


def test_output_field_names_follow_the_formats_extension():
    sample = {"__key__": "k", "jpg": b"", "png": b"", "left.jpeg": b"", "cls": b"1"}
    fields = ["jpg", "png", "left.jpeg"]
    assert output_names(sample, fields) == {"png": "png", "jpg": "jpg.png", "left.jpeg": "left.png"}
    assert output_names(sample, fields, "webp") == {"jpg": "webp", "png": "png.webp", "left.jpeg": "left.webp"}
    assert output_names(sample, fields, "jpg") == {"jpg": "jpg", "png": "png.jpg", "left.jpeg": "left.jpg"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_shard_rewriter_writes_each_format_under_its_extension(tmp_path, protection, fmt):
    samples = make_samples(6, seed=3)
    shard = write_shard(str(tmp_path / "a.tar"), samples)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = protect_shards(protection, [shard], str(tmp_path / "out"), opts(fmt), progress=False)
    assert len(lossy_warnings(record)) == (0 if OutputFormat.parse(fmt).lossless else 1)
    assert stats[0]["written"] == 6
    ext = OutputFormat.parse(fmt).extension
    out = read_tar(str(tmp_path / "out" / "a.tar"))
    for clean, got in zip(samples, out):
        assert list(got) == ["__key__", ext, "cls", "json", "txt"]
        assert got["json"] == clean["json"] and got["cls"] == clean["cls"]
        check_pixels(fmt, got[ext], expected(protection, clean["jpg"], int(clean["cls"])))


def test_the_lossy_warning_says_what_is_lost_and_how_to_measure_it(tmp_path, protection, shards):
    with pytest.warns(LossyOutputWarning, match=r"erases part of the perturbation.*audit --defense "
                                                r"none,publish:jpeg:90"):
        protect_shards(protection, shards, str(tmp_path / "out"), opts("jpeg:90"), progress=False)


def test_protect_warns_once_per_run_whatever_it_writes(tmp_path, protection, shards, dataset_dir):
    for src, dst in ((str(tmp_path / "in"), tmp_path / "o1"), (str(dataset_dir), tmp_path / "o2")):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            protect(src, str(dst), protection, device="cpu", format="jpeg:90", progress=False)
        assert len(lossy_warnings(record)) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        protect(str(tmp_path / "in"), str(tmp_path / "o3"), protection, device="cpu", format="webp", progress=False)
    assert not lossy_warnings(record)


def test_the_pipeline_stage_takes_a_format(protection):
    samples = make_samples(3)
    got = list(protect_stage(protection, device="cpu", format="webp")(iter(samples)))
    assert [list(s) for s in got] == [["__key__", "webp", "cls", "json", "txt"]] * 3
    for clean, s in zip(samples, got):
        check_pixels("webp", s["webp"], expected(protection, clean["jpg"], int(clean["cls"])))


def _gray_and_alpha_samples() -> list[dict]:
    rng = np.random.default_rng(5)
    images = {"rgb": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB"),
              "gray": Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L"),
              "alpha": Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")}
    return [{"__key__": k, "png": encode(im), "cls": b"3"} for k, im in images.items()]


@pytest.mark.parametrize("fmt, refused, reason", [
    ("webp", "gray", "WebP has no grayscale mode"), ("jpeg:90", "alpha", "JPEG holds no alpha"),
])
def test_an_image_the_format_cannot_hold_fails_naming_shard_and_key_or_is_skipped(tmp_path, protection, fmt, refused,
                                                                                reason):
    shard = write_shard(str(tmp_path / "a.tar"), _gray_and_alpha_samples())
    with pytest.raises(SampleError, match=rf"a\.tar: sample '{refused}': image field 'png': {reason}"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        protect_shards(protection, [shard], str(tmp_path / "out"), opts(fmt), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        stats = protect_shards(protection, [shard], str(tmp_path / "out"), opts(fmt, on_error="skip"), progress=False)
    assert [s["key"] for s in stats[0]["skipped"]] == [refused] and reason in stats[0]["skipped"][0]["reason"]
    kept = {s["__key__"]: s for s in read_tar(str(tmp_path / "out" / "a.tar"))}
    assert set(kept) == {"rgb", "gray", "alpha"} - {refused}
    ext = OutputFormat.parse(fmt).extension
    channels = {"rgb": 3, "gray": 1, "alpha": 4}
    assert all(image_tensor(s[ext]).shape[0] == channels[k] for k, s in kept.items())  # read back as protected


# ------------------------------------------------------------------------------------------ resume


def test_png_outputs_keep_the_settings_of_before_and_another_format_redoes_them(tmp_path, protection, shards):
    out = str(tmp_path / "out")
    first = protect_shards(protection, shards, out, opts("png"), progress=False)
    assert first[0]["settings"] == LEGACY_SETTINGS  # so outputs written before formats existed still resume
    assert all(s["resumed"] for s in protect_shards(protection, shards, out, ShardOptions(device="cpu"),
                                                    progress=False))
    redone = protect_shards(protection, shards, out, opts("webp"), progress=False)
    assert not any(s["resumed"] for s in redone) and redone[0]["settings"] == {**LEGACY_SETTINGS, "format": "webp"}
    assert "webp" in read_tar(str(tmp_path / "out" / "shard-00.tar"))[0]
    assert all(s["resumed"] for s in protect_shards(protection, shards, out, opts("WEBP"), progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        assert not any(s["resumed"] for s in protect_shards(protection, shards, out, opts("jpeg:90"), progress=False))
        assert not any(s["resumed"] for s in protect_shards(protection, shards, out, opts("jpeg:80"), progress=False))
    assert not any(s["resumed"] for s in protect_shards(protection, shards, out, opts("png"), progress=False))


# ------------------------------------------------------------------------------------------ parquet and datasets


def _table(path, n=6):
    images, labels = make_dataset(n, seed=4)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels},
                               features=features).to_parquet(str(path))
    return [encode(im) for im in images], labels


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_parquet_rewriter_writes_each_format(tmp_path, protection, fmt):
    pngs, labels = _table(tmp_path / "a.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        protect_parquet(protection, [str(tmp_path / "a.parquet")], str(tmp_path / "out"),
                        opts(fmt, label_field="label", image_field="image"), progress=False)
    rows = pq.read_table(tmp_path / "out" / "a.parquet").to_pylist()
    assert [r["label"] for r in rows] == labels
    for png, label, row in zip(pngs, labels, rows):
        assert row["image"]["path"] is None
        check_pixels(fmt, row["image"]["bytes"], expected(protection, png, label))
    loaded = datasets.Dataset.from_parquet(str(tmp_path / "out" / "a.parquet"))
    assert isinstance(loaded.features["image"], datasets.Image) and loaded[0]["image"].size == (8, 8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_protect_dataset_writes_each_format(protection, fmt):
    pngs, labels = [encode(im) for im in make_dataset(5)[0]], make_dataset(5)[1]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = protect_dataset(datasets.DatasetDict({"a": ds, "b": ds}), protection, device="cpu", format=fmt)
    assert len(lossy_warnings(record)) == (0 if OutputFormat.parse(fmt).lossless else 1)  # once, for both splits
    raw = out["a"].cast_column("image", datasets.Image(decode=False))["image"]
    for png, label, cell in zip(pngs, labels, raw):
        check_pixels(fmt, cell["bytes"], expected(protection, png, label))


def test_the_map_fingerprint_changes_with_the_format_but_not_for_png(protection):
    with pytest.warns(LossyOutputWarning):
        fps = {f: ProtectMap(protection, format=f).fingerprint("x") for f in ("png", "webp", "jpeg:90", "jpeg:95")}
    assert len(set(fps.values())) == 4
    assert ProtectMap(protection).fingerprint("x") == fps["png"]
    assert ProtectMap(protection, format="PNG").fingerprint("x") == fps["png"]
    assert ProtectMap(protection, format="webp").format == "webp"


# ------------------------------------------------------------------------------------------ the CLI


def test_the_cli_writes_the_format_and_warns_once_about_lossy_output(tmp_path, shards, prot, capsys):
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "w"),
                       "--format", "webp") == 0
    assert "webp" in read_tar(str(tmp_path / "w" / "shard-00.tar"))[0]
    assert "warning" not in capsys.readouterr().err
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "j"),
                       "--format", "jpeg:90") == 0
    err = capsys.readouterr().err
    assert err.count("ue-datasets: warning: --format jpeg:90") == 1 and "publish:jpeg:90" in err
    assert "jpg" in read_tar(str(tmp_path / "j" / "shard-00.tar"))[0]
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "x"),
                       "--format", "jpeg") == 2
    assert "needs its quality" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_cli_help_teaches_the_formats(capsys):
    from ue_datasets.cli import main

    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--format FORMAT", "webp", "jpeg:Q", "Lossy, an explicit opt-in", "publish:jpeg:Q", "(default: png)"):
        assert part in text


# ------------------------------------------------------------------------------------------ audit


@pytest.mark.parametrize("spec, name", [
    ("publish:png", "publish:png"), ("publish:WEBP", "publish:webp"), (" publish : jpeg:90 ", "publish:jpeg:90"),
    ("publish:jpg:50", "publish:jpeg:50"),
])
def test_publish_defences_parse_to_canonical_names(spec, name):
    d = parse_defense(spec)
    assert d.name == name and d.description.startswith("published as --format") and parse_defense(d.name) == d


@pytest.mark.parametrize("spec", ["publish", "publish:", "publish:jpeg", "publish:gif", "publish:jpeg:0"])
def test_bad_publish_defences_fail_listing_the_valid_ones(spec):
    with pytest.raises(UEDatasetsError, match="valid defences.*publish:FORMAT"):
        parse_defense(spec)


def _batch(c: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(c).integers(0, 256, (3, c, 16, 16), dtype=np.uint8))


def test_lossless_publish_defences_are_identities_as_their_codecs_are():
    for c in (1, 3):
        x = _batch(c)
        for spec in ("publish:png", "publish:webp"):
            assert torch.equal(parse_defense(spec).apply(x, 0), x)
    x = _batch(3)
    for fmt in ("png", "webp"):  # the codec itself gives the pixels back
        assert all(torch.equal(image_tensor(OutputFormat.parse(fmt).encode(img)), img) for img in x)


def test_publish_jpeg_encodes_as_the_writer_does():
    for c in (1, 3):
        x = _batch(c)
        got = parse_defense("publish:jpeg:90").apply(x, 0)
        assert got.shape == x.shape and not torch.equal(got, x)
        want = torch.stack([image_tensor(OutputFormat.parse("jpeg:90").encode(img)) for img in x])
        assert torch.equal(got, want) and torch.equal(publish(x, "jpeg:90"), want)
    x = _batch(3)
    assert not torch.equal(publish(x, "jpeg:90"), jpeg(x, 90))  # the adversary's JPEG subsamples chroma


# ------------------------------------------------------------------------------------------ verify


def _protect_to(tmp_path, prot, fmt: str, name: str) -> str:
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(out),
                           "--format", fmt) == 0
    return str(out)



def test_verify_checks_webp_outputs_exactly(tmp_path, shards, prot):
    out = _protect_to(tmp_path, prot, "webp", "out")
    report = verify(prot, out, str(tmp_path / "in"))
    assert report.ok, report.summary()
    assert (report.checked, report.protected, report.lossy, report.formats) == (15, 15, 0, ["webp"])
    assert "format webp" in report.summary()
    shard = tmp_path / "out" / "shard-00.tar"
    samples, clean = read_tar(str(shard)), read_tar(shards[0])
    samples[2]["webp"] = OutputFormat.parse("webp").encode(image_tensor(clean[2]["jpg"]))
    restat_shard(shard, samples)
    report = verify(prot, out, str(tmp_path / "in"))
    assert not report.ok and [f.key for f in report.unprotected] == [clean[2]["__key__"]]


def test_verify_reports_jpeg_outputs_plainly_instead_of_failing_them(tmp_path, shards, prot):
    out = _protect_to(tmp_path, prot, "jpeg:90", "out")
    report = verify(prot, out, str(tmp_path / "in"))
    assert report.ok, report.summary()
    assert (report.checked, report.protected, report.lossy, report.lossy_exact) == (15, 15, 15, 15)
    assert report.formats == ["jpeg:90"] and 0 < report.lossy_max_diff <= JPEG90_MAX_DIFF
    assert report.lossy_min_psnr > JPEG90_MIN_PSNR
    assert "written lossy (JPEG): exact pixels cannot be checked" in report.summary()
    assert json.loads(json.dumps(report.to_dict()))["lossy"] == 15

    shard = tmp_path / "out" / "shard-00.tar"
    samples, clean = read_tar(str(shard)), read_tar(shards[0])
    # another encoder's bytes (here: another quality) are reported, not failed
    samples[1]["jpg"] = OutputFormat.parse("jpeg:80").encode(image_tensor(samples[1]["jpg"]))
    restat_shard(shard, samples)
    report = verify(prot, out, str(tmp_path / "in"))
    assert report.ok and [f.key for f in report.approximate] == [clean[1]["__key__"]], report.summary()
    # the clean image written as JPEG is unprotected
    samples[3]["jpg"] = OutputFormat.parse("jpeg:90").encode(image_tensor(clean[3]["jpg"]))
    restat_shard(shard, samples)
    report = verify(prot, out, str(tmp_path / "in"))
    assert [f.key for f in report.approximate] == [clean[1]["__key__"]] and "PSNR" in report.approximate[0].reason
    assert [f.key for f in report.unprotected] == [clean[3]["__key__"]]
    assert not report.ok and report.protected == 13 and "approximate: 1 (informational" in report.summary()
    samples[3] = {**samples[3], "jpg": OutputFormat.parse("jpeg:90").encode(torch.zeros((3, 5, 5), dtype=torch.uint8))}
    restat_shard(shard, samples)
    assert [f.key for f in verify(prot, out, str(tmp_path / "in")).tampered] == [clean[3]["__key__"]]


def test_verify_checks_every_other_field_of_jpeg_outputs(tmp_path, shards, prot):
    out = _protect_to(tmp_path, prot, "jpeg:90", "out")
    shard = tmp_path / "out" / "shard-00.tar"
    samples = read_tar(str(shard))
    samples[0]["cls"] = b"9" if samples[0]["cls"] != b"9" else b"8"
    restat_shard(shard, samples)
    report = verify(prot, out, str(tmp_path / "in"))
    assert [f.reason for f in report.tampered] == ["label differs from the clean source"]


@pytest.mark.parametrize("fmt", ["webp", "jpeg:90"])
def test_verify_checks_datasets_and_parquet_in_their_format(tmp_path, prot, dataset_dir, fmt):
    out = _protect_to_dataset(tmp_path, prot, dataset_dir, fmt)
    report = verify(prot, out, str(dataset_dir))
    assert report.ok and report.checked == report.protected == 6 and report.formats == [fmt], report.summary()
    assert report.lossy == (0 if fmt == "webp" else 6)
    (tmp_path / "pq").mkdir()
    _table(tmp_path / "pq" / "a.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        protect(str(tmp_path / "pq"), str(tmp_path / "pq-out"), prot, device="cpu", format=fmt, progress=False)
    report = verify(prot, str(tmp_path / "pq-out"), str(tmp_path / "pq"))
    assert report.ok and report.checked == report.protected == 6 and report.formats == [fmt], report.summary()


def _protect_to_dataset(tmp_path, prot, dataset_dir, fmt) -> str:
    out = tmp_path / f"ds-{fmt.replace(':', '')}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyOutputWarning)
        protect(str(dataset_dir), str(out), prot, device="cpu", format=fmt, progress=False)
    return str(out)


def test_protect_samples_refuses_nothing_it_can_write(protection):
    """Mixed modes each go to the format that holds them: PNG takes all of them."""
    got = list(protect_samples(protection, _gray_and_alpha_samples(), ShardOptions(device="cpu")))
    assert [image_tensor(s["png"]).shape[0] for s in got] == [3, 1, 4]


def test_a_dataset_directory_is_redone_in_another_format_and_resumed_in_the_same(tmp_path, protection, dataset_dir):
    def run(fmt):
        return protect(str(dataset_dir), str(tmp_path / "out"), protection, device="cpu", format=fmt, progress=False)

    assert "format" not in run("png").files[0]["settings"]
    assert run("png").resumed == 1
    redone = run("webp")
    assert redone.resumed == 0 and redone.files[0]["settings"]["format"] == "webp"
    assert run("webp").resumed == 1
