"""Unlearnable Clusters' key-derived modes: ``blocks`` (bounded +-eps block patterns, optionally refined) and
``filters`` (a CUDA filter per cluster, unbounded)."""

from __future__ import annotations

import pytest
import torch

from conftest import encode, png_pixels, read_tar, write_shard
from test_clusters import EPS, _images
from ue_datasets.apply.clusters import assign_clusters
from ue_datasets.apply.core import protect_batch
from ue_datasets.artifact import load_protection
from ue_datasets.cli import main
from ue_datasets.encoders import parse_encoder
from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit.cluster_patterns import block_patterns, cluster_filters
from ue_datasets.fit.clusters import fit_clusters, label_purity
from ue_datasets.fit.convolution import draw_filters
from ue_datasets.kernels.convolution import filter_images


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A labelled shard of 24 images in three colour groups and a tiny resnet18 encoder spec."""
    import torchvision

    d = tmp_path_factory.mktemp("uc-modes")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "rn18.pth")
    pngs = [encode(im) for im in _images()]
    keys = [f"k{i:03d}" for i in range(len(pngs))]
    labels = [(i // 3) % 3 for i in range(len(pngs))]
    (d / "in").mkdir()
    shard = write_shard(str(d / "in" / "s-000.tar"), [{"__key__": k, "png": b, "cls": str(y).encode()}
                                                      for k, b, y in zip(keys, pngs, labels)])
    return {"dir": d, "shard": shard, "pngs": pngs, "keys": keys, "labels": labels,
            "spec": parse_encoder(f"torchvision:resnet18:{d / 'rn18.pth'}", size=16)}


def _fit(source, **kw):
    kw = {"clusters": 3, "batch_size": 8, "resolution": 8, "device": "cpu", "progress": False, **kw}
    return fit_clusters(source["shard"], source["spec"], **kw)


def test_block_patterns_are_distinct_plus_minus_eps_boards_determined_by_the_key():
    a = block_patterns(10, 1, 28, EPS, key=7)
    assert a.shape == (10, 1, 28, 28) and a.dtype == torch.float32
    assert a.unique().tolist() == pytest.approx([-EPS, EPS])
    assert torch.equal(a, block_patterns(10, 1, 28, EPS, key=7))
    assert not torch.equal(a, block_patterns(10, 1, 28, EPS, key=8))
    assert len({tuple(p.flatten().tolist()) for p in a}) == 10
    board = a[:, :, ::7, ::7]  # one value per 7 x 7 block
    assert torch.equal(a, board.repeat_interleave(7, -1).repeat_interleave(7, -2))
    with pytest.raises(UEDatasetsError, match="too few sign patterns"):
        block_patterns(3, 1, 8, EPS, key=0, grid=1)


def test_blocks_mode_stores_its_key_derived_patterns_and_keeps_the_bound_after_quantisation(source):
    p = _fit(source, mode="blocks", key=11)
    C = p.params["channels"]
    assert torch.equal(p.tensors["deltas"], block_patterns(3, C, 8, EPS, key=11))
    assert p.params["mode"] == "blocks" and p.params["grid"] == 4 and p.params["epochs"] == 0
    assert "key" not in p.params  # the key is not stored
    x = [png_pixels(b) for b in source["pngs"]]  # mixed sizes and modes
    out = protect_batch(p, x, keys=source["keys"])
    assert max(int((a.int() - b.int()).abs().max()) for a, b in zip(out, x)) == round(255 * EPS)


def test_refined_blocks_start_from_the_patterns_and_stay_bounded(source):
    start = _fit(source, mode="blocks", key=3).tensors["deltas"]
    refined = _fit(source, mode="blocks", key=3, epochs=1).tensors["deltas"]
    assert not torch.equal(start, refined)
    assert float(refined.abs().max()) <= EPS + 1e-7
    steps = 3  # one epoch of 24 images in batches of 8, each a signed step of lr * eps = 0.1 * eps
    assert float((refined - start).abs().max()) <= steps * 0.1 * EPS + 1e-6


def test_filters_mode_convolves_each_image_with_its_clusters_key_derived_filter(source):
    p = _fit(source, mode="filters", key=5)
    assert "deltas" not in p.tensors and p.params["eps"] is None and p.params["kernel"] == "filter"
    assert torch.equal(p.tensors["filters"], cluster_filters(3, 5))
    assert torch.equal(cluster_filters(3, 5), torch.from_numpy(draw_filters(3, 5, 3, 0.3)).float())
    x = torch.stack([png_pixels(b) for b in source["pngs"][0:9:3]])  # three 16 x 16 RGB images
    keys = source["keys"][0:9:3]
    clusters = assign_clusters(p, x, keys)
    expected = filter_images(x, p.tensors["filters"][clusters], False, "truncate")
    assert torch.equal(protect_batch(p, x, keys=keys), expected)
    assert torch.equal(protect_batch(p, x, keys=keys), protect_batch(p, x))  # stored clusters = nearest centers


def test_keyed_modes_are_deterministic_and_other_modes_refuse_a_key(source):
    for mode in ("blocks", "filters"):
        a, b = _fit(source, mode=mode, key=9), _fit(source, mode=mode, key=9)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    with pytest.raises(UEDatasetsError, match="key is used by"):
        _fit(source, mode="fast", key=1, epochs=1)
    with pytest.raises(UEDatasetsError, match="epochs must be 0"):
        _fit(source, mode="filters", key=1, epochs=2)


def test_label_purity_reads_the_sources_labels_only_to_measure(source):
    p = _fit(source, mode="blocks", key=1)
    purity = label_purity(p, source["shard"])
    clusters = torch.tensor([p.tensors["assignments"][i] for i in range(24)])
    labels = torch.tensor(source["labels"])
    majority = sum(int(torch.bincount(labels[clusters == c]).max()) for c in clusters.unique())
    assert purity == pytest.approx(majority / 24)
    unlabelled = write_shard(str(source["dir"] / "u-000.tar"), [{"__key__": k, "png": b}
                                                                for k, b in zip(source["keys"], source["pngs"])])
    with pytest.raises(UEDatasetsError, match="cls"):
        label_purity(p, unlabelled)


def test_cli_fits_blocks_and_filters_and_prints_purity(source, tmp_path, capsys):
    spec = f"torchvision:resnet18:{source['dir'] / 'rn18.pth'}"
    for mode in ("blocks", "filters"):
        out = tmp_path / mode
        assert main(["fit", "clusters", "--input", source["shard"], "--encoder", spec, "--image-size", "16",
                     "--clusters", "3", "--mode", mode, "--key", "4", "--resolution", "8", "--device", "cpu",
                     "-o", str(out), "--no-progress"]) == 0
        text = capsys.readouterr().out
        assert "cluster purity w.r.t. the source's labels: " in text
        assert ("unbounded (filters)" in text) == (mode == "filters")
        assert main(["protect", "--protection", str(out), "--input", source["shard"], "--output",
                     str(tmp_path / f"{mode}-out"), "--no-progress"]) == 0
        protected = [png_pixels(s["png"]) for s in read_tar(tmp_path / f"{mode}-out" / "s-000.tar")]
        p = load_protection(out)
        expected = [protect_batch(p, png_pixels(b)[None], keys=[k])[0] for b, k in zip(source["pngs"], source["keys"])]
        assert all(torch.equal(a, b) for a, b in zip(protected, expected))


def test_oracle_of_a_filters_protection_filters_by_the_attackers_label(source):
    from ue_datasets.audit.purity import oracle_protection

    p = _fit(source, mode="filters", key=2)
    x = torch.stack([png_pixels(b) for b in source["pngs"][0:9:3]])
    labels = torch.tensor([2, 0, 4])  # 4 wraps to cluster 1 of 3
    out = protect_batch(oracle_protection(p), x, labels=labels % 3)
    assert torch.equal(out, filter_images(x, p.tensors["filters"][torch.tensor([2, 0, 1])], False, "truncate"))


def test_filter_kernel_is_refused_where_no_table_of_filters_can_be_looked_up(source):
    from dataclasses import replace

    p = _fit(source, mode="blocks", key=1)  # holds deltas, no filters
    x = torch.stack([png_pixels(b) for b in source["pngs"][0:9:3]])
    broken = replace(p, params={**p.params, "kernel": "filter", "grayscale": False, "quantize": "truncate"})
    with pytest.raises(UEDatasetsError, match="filter kernel"):
        protect_batch(broken, x)


def test_bad_grid_and_filter_options_fail_before_the_features_pass(source, monkeypatch):
    from ue_datasets.fit import clusters as fc

    monkeypatch.setattr(fc, "extract_features", lambda *a, **k: pytest.fail("features pass started"))
    with pytest.raises(UEDatasetsError, match="kernel_size"):
        _fit(source, mode="filters", key=1, kernel_size=4)
    with pytest.raises(UEDatasetsError, match="grid"):
        _fit(source, mode="blocks", key=1, grid=9)  # more blocks than the 8 pixels of R
