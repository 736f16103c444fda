"""All adapters give the same pixels for the same input, for every kind of method (CUDA, EM class- and
sample-wise, Unlearnable Clusters with additive blocks and with filters): transform, datasets.map,
webdataset stage and shard rewriter, parquet rewriter, ProtectedDataset, and the CLI."""

from __future__ import annotations

import io

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import mixed_inputs, png_pixels, read_tar, to_chw, write_shard
from test_noise import _classwise, _samplewise
from ue_datasets.apply.hf import protect_dataset
from ue_datasets.apply.wds import protect_stage
from ue_datasets.artifact import load_protection
from ue_datasets.cli import main
from ue_datasets.transforms import Protect, ProtectedDataset


def _clusters(tmp_path, pngs: list[bytes], keys: list[str], mode: str):
    """A clusters protection fitted on the inputs with the weightless pixels encoder (rebuilt from its spec
    in every adapter), ``blocks`` (additive) or ``filters`` (convolution) mode."""
    from ue_datasets.fit.clusters import fit_clusters

    (tmp_path / "fit").mkdir()
    shard = write_shard(tmp_path / "fit" / "s-000.tar", [{"__key__": k, "png": b} for k, b in zip(keys, pngs)])
    return fit_clusters(shard, "pixels:8", clusters=3, mode=mode, key=1, resolution=8, device="cpu",
                        progress=False)


@pytest.mark.parametrize("kind", ["convolution", "em-classwise", "em-samplewise", "clusters-blocks",
                                  "clusters-filters"])
def test_transform_map_stage_shards_parquet_dataset_and_cli_give_identical_pixels(tmp_path, request, kind):
    pngs, labels = mixed_inputs()
    keys = [str(i) for i in range(len(pngs))]  # the row index: the key datasets.map and parquet use too
    if kind == "convolution":
        protection = request.getfixturevalue("protection")
    elif kind == "em-classwise":
        protection = _classwise()
    elif kind == "em-samplewise":
        protection = _samplewise(tmp_path, [png_pixels(b) for b in pngs], keys)
    else:
        protection = _clusters(tmp_path, pngs, keys, kind.split("-")[1])
    protection.save(tmp_path / "prot")
    protection = load_protection(tmp_path / "prot")

    # torchvision v2 transform, one sample at a time
    transform = Protect(protection, keys_getter=lambda inputs: inputs[2])
    by_transform = [to_chw(transform(Image.open(io.BytesIO(b)), y, k)[0]) for b, y, k in zip(pngs, labels, keys)]

    # datasets.map
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels},
                                    features=features)
    by_map = [to_chw(im) for im in protect_dataset(ds, protection, batch_size=5)["image"]]

    # webdataset shard rewriting through the CLI, batch size 5
    (tmp_path / "in").mkdir()
    samples = [{"__key__": k, "png": b, "cls": str(y).encode()} for k, b, y in zip(keys, pngs, labels)]
    shard = write_shard(tmp_path / "in" / "s-000.tar", samples)
    assert main(["protect", "--protection", str(tmp_path / "prot"), "--input", shard, "--output",
                 str(tmp_path / "out"), "--batch-size", "5", "--no-progress"]) == 0
    by_cli = [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")]

    # webdataset pipeline stage
    stage = protect_stage(protection, batch_size=3)
    by_stage = [png_pixels(s["png"]) for s in wds.WebDataset(shard, shardshuffle=False).compose(stage)]

    # CLI on a save_to_disk directory
    ds.save_to_disk(str(tmp_path / "hf"))
    assert main(["protect", "--protection", str(tmp_path / "prot"), "--input", str(tmp_path / "hf"), "--output",
                 str(tmp_path / "hf-out"), "--no-progress"]) == 0
    by_cli_hf = [to_chw(im) for im in datasets.load_from_disk(str(tmp_path / "hf-out"))["image"]]

    # CLI on a parquet file, batch size 4
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}),
                   tmp_path / "pq" / "a.parquet")
    assert main(["protect", "--protection", str(tmp_path / "prot"), "--input", str(tmp_path / "pq" / "a.parquet"),
                 "--output", str(tmp_path / "pq-out"), "--batch-size", "4", "--no-progress"]) == 0
    by_parquet = [png_pixels(r["bytes"]) for r in pq.read_table(tmp_path / "pq-out" / "a.parquet")["image"].to_pylist()]

    # ProtectedDataset around a map-style dataset (the index is the key)
    by_dataset = [to_chw(image) for image, _ in ProtectedDataset(
        [(Image.open(io.BytesIO(b)), y) for b, y in zip(pngs, labels)], protection)]

    for results in (by_map, by_cli, by_stage, by_cli_hf, by_parquet, by_dataset):
        assert len(results) == len(by_transform)
        for a, b in zip(by_transform, results):
            assert torch.equal(a, b)
    changed = [not torch.equal(a, png_pixels(b)) for a, b in zip(by_transform, pngs)]
    # the bounded noise methods change every image; filters may leave a flat image as it was
    assert all(changed) if kind.startswith("em") or kind == "clusters-blocks" else any(changed)
