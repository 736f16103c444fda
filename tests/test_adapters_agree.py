"""All adapters give the same pixels for the same input: transform, datasets.map, webdataset, CLI."""

from __future__ import annotations

import io

import datasets
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from conftest import encode, png_pixels, read_tar, to_chw, write_shard
from ue_datasets.apply.hf import protect_dataset
from ue_datasets.apply.wds import protect_stage
from ue_datasets.cli import main
from ue_datasets.transforms import Protect


def _inputs():
    """Mixed sizes and modes: RGB, L, RGBA; PNG-encoded so every adapter sees the same pixels."""
    rng = np.random.default_rng(7)
    images = []
    for i in range(12):
        h, w = [(8, 8), (10, 6), (16, 12)][i % 3]
        mode = ["RGB", "L", "RGBA"][i % 3 if i < 9 else 0]
        shape = {"RGB": (h, w, 3), "L": (h, w), "RGBA": (h, w, 4)}[mode]
        images.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode))
    labels = [int(v) for v in rng.integers(0, 10, 12)]
    return [encode(im) for im in images], labels


def test_transform_map_stage_shards_and_cli_give_identical_pixels(tmp_path, protection):
    pngs, labels = _inputs()
    keys = [f"k{i:03d}" for i in range(len(pngs))]
    protection.save(tmp_path / "prot")

    # torchvision v2 transform, one sample at a time
    by_transform = [to_chw(Protect(protection)(Image.open(io.BytesIO(b)), y)[0]) for b, y in zip(pngs, labels)]

    # datasets.map
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}, features=features)
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

    for results in (by_map, by_cli, by_stage, by_cli_hf):
        assert len(results) == len(by_transform)
        for a, b in zip(by_transform, results):
            assert torch.equal(a, b)
    assert any(not torch.equal(a, to_chw(Image.open(io.BytesIO(b)))) for a, b in zip(by_transform, pngs))
