"""Hugging Face ``datasets`` adapter: `ProtectMap` and `protect_dataset`."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

datasets = pytest.importorskip("datasets")
from datasets import ClassLabel, Dataset, Features, Image, Value  # noqa: E402

from conftest import encode, make_dataset, make_samples, png_pixels, read_tar, to_chw, write_shard  # noqa: E402
from ue_datasets import SampleError, UEDatasetsError, fit_convolution, protect_batch  # noqa: E402
from ue_datasets.apply.hf import ProtectMap, protect_dataset  # noqa: E402
from ue_datasets.apply.shards import ShardOptions  # noqa: E402
from ue_datasets.apply.wds import protect_shards  # noqa: E402

FEATURES = Features({"image": Image(), "label": ClassLabel(num_classes=10), "caption": Value("string")})
N = 7


@pytest.fixture(scope="module")
def source():
    """PNG bytes, labels and captions of N small images of mixed sizes."""
    images, labels = make_dataset(N, seed=21)
    pngs = [encode(im, "PNG") for im in images]
    captions = [f"caption {i}" for i in range(N)]
    return pngs, labels, captions


def make_ds(source, labels=None) -> Dataset:
    pngs, lab, captions = source
    return Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels or lab, "caption": captions},
        features=FEATURES,
    )


def expected(protection, png: bytes, label: int) -> torch.Tensor:
    from PIL import Image as PILImage

    return protect_batch(protection, [to_chw(PILImage.open(io.BytesIO(png)).convert("RGB"))], labels=[label])[0]


def raw_images(ds: Dataset) -> list[dict]:
    return list(ds.cast_column("image", Image(decode=False))["image"])


def test_protect_dataset_keeps_features_rows_and_writes_protect_batch_pixels_as_png_bytes(source, protection):
    ds = make_ds(source)
    out = protect_dataset(ds, protection, batch_size=3, device="cpu")
    assert out.features == ds.features
    assert isinstance(out.features["image"], Image)
    assert len(out) == N
    assert out["label"] == ds["label"] and out["caption"] == ds["caption"]
    pngs, labels, _ = source
    for raw, png, label in zip(raw_images(out), pngs, labels):
        assert raw["path"] is None and raw["bytes"]
        assert torch.equal(png_pixels(raw["bytes"]), expected(protection, png, label))
        assert not torch.equal(png_pixels(raw["bytes"]), png_pixels(png))
    # Decoded access gives the same pixels.
    assert torch.equal(to_chw(out[0]["image"]), expected(protection, pngs[0], labels[0]))


def test_protect_dataset_writes_the_same_bytes_at_the_default_and_any_other_batch_size(source, protection):
    ds = make_ds(source)
    by_default = raw_images(protect_dataset(ds, protection, device="cpu"))  # batch_size 1000: one batch
    for batch_size in (1, 3):
        assert raw_images(protect_dataset(ds, protection, batch_size=batch_size, device="cpu")) == by_default

def test_dataset_pixels_equal_the_webdataset_rewriter_for_the_same_png_bytes(source, protection, tmp_path):
    pngs, labels, _ = source
    samples = make_samples(N, seed=0, fmt="png")
    for s, png, label in zip(samples, pngs, labels):
        s["png"], s["cls"] = png, str(label).encode()
    shard = write_shard(str(tmp_path / "s.tar"), samples)
    protect_shards(protection, [shard], str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)
    rewritten = read_tar(tmp_path / "out" / "s.tar")
    out = protect_dataset(make_ds(source), protection, device="cpu")
    for raw, r in zip(raw_images(out), rewritten):
        assert torch.equal(png_pixels(raw["bytes"]), png_pixels(r["png"]))


def test_new_fingerprint_is_deterministic_and_depends_on_the_protection(source, protection, other_protection):
    ds = make_ds(source)
    a = protect_dataset(ds, protection, device="cpu")
    b = protect_dataset(ds, protection, device="cpu")
    c = protect_dataset(ds, other_protection, device="cpu")
    undecoded = ds.cast_column("image", datasets.Image(decode=False))  # protect_dataset decodes in the map
    assert a._fingerprint == b._fingerprint == ProtectMap(protection).fingerprint(undecoded._fingerprint)
    assert a._fingerprint != c._fingerprint
    assert a._fingerprint != ds._fingerprint
    assert ProtectMap(protection).fingerprint("x") != ProtectMap(protection).fingerprint("y")
    assert ProtectMap(protection).fingerprint("x") != ProtectMap(protection, png_level=6).fingerprint("x")


def test_streaming_dataset_gives_the_same_pixels(source, protection):
    ds = make_ds(source)
    streamed = protect_dataset(ds.to_iterable_dataset(), protection, batch_size=2, device="cpu")
    assert isinstance(streamed, datasets.IterableDataset)
    rows = list(streamed)
    pngs, labels, captions = source
    assert len(rows) == N
    assert [r["label"] for r in rows] == labels and [r["caption"] for r in rows] == captions
    for row, png, label in zip(rows, pngs, labels):
        pixels = to_chw(row["image"])
        assert torch.equal(pixels, expected(protection, png, label))


def test_streaming_dataset_yields_decoded_images_like_the_input(source, protection):
    from PIL import Image as PILImage

    it = make_ds(source).to_iterable_dataset()
    assert isinstance(next(iter(it))["image"], PILImage.Image)
    streamed = protect_dataset(it, protection, device="cpu")
    assert isinstance(next(iter(streamed))["image"], PILImage.Image)


def test_dataset_dict_protects_every_split(source, protection):
    dd = datasets.DatasetDict({"train": make_ds(source), "test": make_ds(source).select(range(2))})
    out = protect_dataset(dd, protection, device="cpu")
    assert set(out) == {"train", "test"} and len(out["test"]) == 2
    assert raw_images(out["test"]) == raw_images(out["train"])[:2]


def test_save_to_disk_and_load_from_disk_round_trip(source, protection, tmp_path):
    out = protect_dataset(make_ds(source), protection, device="cpu")
    out.save_to_disk(str(tmp_path / "saved"))
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert back.features == out.features
    assert raw_images(back) == raw_images(out)
    assert back["label"] == out["label"]


def test_bad_label_raises_sample_error_naming_the_row(source, protection):
    labels = list(source[1])
    labels[4] = -1  # ClassLabel accepts -1 (no label); the protection cannot
    ds = make_ds(source, labels)
    with pytest.raises(SampleError) as info:
        protect_dataset(ds, protection, batch_size=3, device="cpu")
    assert info.value.key == "4"
    assert "'4'" in str(info.value) and "out of range" in str(info.value)


def test_skip_drops_the_bad_row_and_records_it(source, protection):
    labels = list(source[1])
    labels[4] = -1
    ds = make_ds(source, labels)
    with pytest.warns(UserWarning, match="skipped"):
        out = protect_dataset(ds, protection, batch_size=3, device="cpu", on_error="skip")
    assert len(out) == N - 1
    assert out["caption"] == [c for i, c in enumerate(source[2]) if i != 4]

    fn = ProtectMap(protection, device="cpu", on_error="skip")
    batch = ds[:N]
    with pytest.warns(UserWarning):
        result = fn(batch, indices=list(range(N)))
    assert fn.skipped == [{"source": "dataset", "key": "4", "reason": "label -1 is out of range [0, 10)"}]
    assert len(result["image"]) == len(result["label"]) == len(result["caption"]) == N - 1
    assert result["caption"] == [c for i, c in enumerate(source[2]) if i != 4]


def test_protect_map_returns_raw_bytes_for_binary_columns(source, protection):
    pngs, labels, _ = source
    fn = ProtectMap(protection, device="cpu", as_bytes=True)
    out = fn({"image": pngs[:2], "label": labels[:2]}, indices=[0, 1])
    assert all(isinstance(b, bytes) for b in out["image"])
    assert torch.equal(png_pixels(out["image"][1]), expected(protection, pngs[1], labels[1]))


def test_protect_map_reports_missing_columns(source, protection):
    fn = ProtectMap(protection, device="cpu")
    with pytest.raises(UEDatasetsError, match="image column"):
        fn({"img": [source[0][0]], "label": [1]})
    with pytest.raises(UEDatasetsError, match="label column"):
        fn({"image": [source[0][0]]})
    with pytest.raises(UEDatasetsError, match="on_error"):
        ProtectMap(protection, on_error="ignore")


def test_protect_map_from_an_artifact_path_pickles_small_and_works_after_unpickling(source, protection, tmp_path):
    path = protection.save(tmp_path / "prot")
    fn = ProtectMap(str(path), device="cpu")
    fn.protection  # loaded now; must still not travel in the pickle
    blob = pickle.dumps(fn)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    pngs, labels, _ = source
    batch = {"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}
    got = clone(batch, indices=list(range(N)))
    want = ProtectMap(protection, device="cpu")(batch, indices=list(range(N)))
    assert [g["bytes"] for g in got["image"]] == [w["bytes"] for w in want["image"]]
    assert clone.fingerprint("x") == ProtectMap(protection).fingerprint("x")


def test_protect_map_from_a_path_refuses_an_artifact_replaced_after_pickling(source, protection, tmp_path):
    path = protection.save(tmp_path / "prot")
    blob = pickle.dumps(ProtectMap(str(path), device="cpu"))
    fit_convolution(10, key=99).save(path, overwrite=True)
    clone = pickle.loads(blob)
    with pytest.raises(UEDatasetsError, match="changed"):
        clone({"image": [source[0][0]], "label": [1]}, indices=[0])
