"""Parquet files in, parquet files out: features kept, pixels protected, bad rows named."""

from __future__ import annotations

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from conftest import encode, make_dataset, to_chw
from ue_datasets import SampleError, protect_batch
from ue_datasets.apply.parquet import protect_parquet
from ue_datasets.apply.shards import ShardOptions

OPTIONS = ShardOptions(label_field="label", image_field="image", batch_size=4, device="cpu")


def _parquet(path, n=10, seed=0, labels=None):
    images, default_labels = make_dataset(n, seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10),
                                  "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": encode(im), "path": None} for im in images], "label": labels or default_labels,
         "caption": [f"c{i}" for i in range(n)]},
        features=features,
    )
    ds.to_parquet(str(path))
    return images, labels or default_labels


def test_parquet_rewrite_keeps_features_and_other_columns(tmp_path, protection):
    images, labels = _parquet(tmp_path / "a.parquet")
    stats = protect_parquet(protection, [str(tmp_path / "a.parquet")], str(tmp_path / "out"), OPTIONS, progress=False)
    assert stats[0]["written"] == 10 and stats[0]["skipped"] == []
    out = datasets.Dataset.from_parquet(str(tmp_path / "out" / "a.parquet"))
    assert isinstance(out.features["image"], datasets.Image)
    assert isinstance(out.features["label"], datasets.ClassLabel)
    assert out["caption"] == [f"c{i}" for i in range(10)] and out["label"] == labels
    raw = pq.read_table(tmp_path / "out" / "a.parquet").column("image").to_pylist()
    assert all(r["path"] is None and r["bytes"][:4] == b"\x89PNG" for r in raw)
    for img, label, got in zip(images, labels, out["image"]):
        assert torch.equal(to_chw(got), protect_batch(protection, to_chw(img)[None], [label])[0])


def test_parquet_rerun_skips_completed_files(tmp_path, protection):
    _parquet(tmp_path / "a.parquet")
    protect_parquet(protection, [str(tmp_path / "a.parquet")], str(tmp_path / "out"), OPTIONS, progress=False)
    again = protect_parquet(protection, [str(tmp_path / "a.parquet")], str(tmp_path / "out"), OPTIONS, progress=False)
    assert again[0]["resumed"] is True


def test_parquet_bad_label_fails_naming_file_and_row_or_is_skipped(tmp_path, protection):
    labels = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    _parquet(tmp_path / "a.parquet", labels=labels)
    table = pq.read_table(tmp_path / "a.parquet")
    import pyarrow as pa

    bad = table.set_column(1, table.schema.field(1), pa.array([1, 2, 3, 42, 5, 6, 7, 8, 9, 0], type=pa.int64()))
    pq.write_table(bad.replace_schema_metadata(None), tmp_path / "b.parquet")
    with pytest.raises(SampleError, match=r"b\.parquet: sample '3': label 42 is out of range"):
        protect_parquet(protection, [str(tmp_path / "b.parquet")], str(tmp_path / "out"), OPTIONS, progress=False)
    assert not (tmp_path / "out" / "b.parquet").exists()
    stats = protect_parquet(protection, [str(tmp_path / "b.parquet")], str(tmp_path / "out"),
                            OPTIONS.replace(on_error="skip"), progress=False)
    assert stats[0]["written"] == 9 and stats[0]["skipped"] == [{"key": "3", "reason": "label 42 is out of range [0, 10)"}]
    assert pq.read_table(tmp_path / "out" / "b.parquet").num_rows == 9
