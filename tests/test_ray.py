"""Ray: the engine writes what the local engine writes (bytes, names, stats) and resumes alike, retries
a failed task and then reports it by file; the Ray Data adapter gives the pixels every other adapter
gives; without ray, ``--engine ray`` fails at once with the install command.

The Ray tests start a local cluster (``ray.init(num_cpus=2)``, about 12 s, once for the module) and skip
when ray is not installed (``pip install "ue-datasets[ray]"``).
"""

from __future__ import annotations

import io
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import mixed_inputs, png_pixels, protect_cli, read_tar, to_chw, tree, write_shard
from PIL import Image
from test_noise import _classwise, _samplewise
from ue_datasets.transforms import Protect

from ue_datasets.apply.ray import RayEngine, RayTasksFailed
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shard, protect_shards
from ue_datasets.artifact import load_protection
from ue_datasets.errors import SampleError

#: Stats fields that say how long a file took, or that this run found it done: the rest must match.
TIMING = ("seconds", "resumed")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's rewrites reach the workers
    if ray.is_initialized():  # one that an earlier test (the README's Ray Data example) started
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _shards(folder, count: int = 3, per: int = 4) -> list[str]:
    pngs, labels = mixed_inputs()
    folder.mkdir()
    urls = []
    for s in range(count):
        samples = [{"__key__": f"{s}-{i}", "png": pngs[(s * per + i) % len(pngs)],
                    "cls": str(labels[(s * per + i) % len(labels)]).encode()} for i in range(per)]
        urls.append(write_shard(folder / f"shard-{s:03d}.tar", samples))
    return urls


def _stats(folder) -> dict[str, dict]:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING}
            for p in sorted(folder.glob("*_stats.json"))}


def _outputs(folder) -> dict[str, str]:
    return {name: digest for name, digest in tree(folder).items() if not name.endswith("_stats.json")}


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_bytes_names_and_stats(ray_cluster, tmp_path, protection, prot):
    urls = _shards(tmp_path / "in")
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "local")) == 0
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "ray"),
                       "--engine", "ray") == 0
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert len(_outputs(tmp_path / "ray")) == len(urls)
    assert _stats(tmp_path / "ray") == _stats(tmp_path / "local")

    # parquet files alike, through the Python API
    pngs, labels = mixed_inputs()
    (tmp_path / "pq").mkdir()
    for n in range(2):
        pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels}),
                       tmp_path / "pq" / f"part-{n}.parquet")
    from ue_datasets import protect

    protect(str(tmp_path / "pq"), tmp_path / "pq-local", protection, device="cpu", progress=False)
    protect(str(tmp_path / "pq"), tmp_path / "pq-ray", protection, device="cpu", progress=False, engine="ray")
    assert _outputs(tmp_path / "pq-ray") == _outputs(tmp_path / "pq-local")
    assert _stats(tmp_path / "pq-ray") == _stats(tmp_path / "pq-local")


@pytest.mark.slow
def test_ray_engine_resumes_what_the_local_engine_completed(ray_cluster, tmp_path, protection):
    urls = _shards(tmp_path / "in")
    options = ShardOptions(device="cpu")
    protect_shards(protection, urls[:2], str(tmp_path / "out"), options, progress=False)
    before = tree(tmp_path / "out")
    stats = protect_shards(protection, urls, str(tmp_path / "out"), options, progress=False, engine=RayEngine())
    assert [s["resumed"] for s in stats] == [True, True, False]
    after = tree(tmp_path / "out")
    assert {k: after[k] for k in before} == before  # completed files untouched


def _flaky_rewrite(protection, in_url, out_url, options, progress, overwrite):
    """Fails once for shard-001 (a marker file records the first try) and always for shard-002."""
    from pathlib import Path

    name = Path(in_url).name
    marker = Path(in_url).with_suffix(".tried")
    if name == "shard-002.tar":
        raise RuntimeError("disk vanished")
    if name == "shard-001.tar" and not marker.exists():
        marker.write_text("1")
        raise RuntimeError("flaky network")
    return protect_shard(protection, in_url, out_url, options, progress, overwrite)


@pytest.mark.slow
def test_a_failed_ray_task_is_retried_then_reported_by_file(ray_cluster, tmp_path, protection):
    from ue_datasets.apply.shards import run

    urls = _shards(tmp_path / "in")
    with pytest.raises(RayTasksFailed) as info:
        run(_flaky_rewrite, protection, urls, str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False,
            engine=RayEngine(max_retries=2))
    assert list(info.value.failures) == ["shard-002.tar"]
    assert "disk vanished" in info.value.failures["shard-002.tar"] and "tried 3 times" in str(info.value)
    written = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert written == ["shard-000.tar", "shard-001.tar"]  # the retried file made it; the failed one left nothing
    assert not list((tmp_path / "out").glob("*partial*"))


@pytest.mark.slow
def test_a_bad_sample_on_ray_fails_naming_file_and_key_without_retries(ray_cluster, tmp_path, protection):
    (tmp_path / "in").mkdir()
    pngs, _ = mixed_inputs()
    shard = write_shard(tmp_path / "in" / "bad.tar", [{"__key__": "ok", "png": pngs[0], "cls": b"1"},
                                                      {"__key__": "broken", "png": b"\x89PNG not really", "cls": b"2"}])
    with pytest.raises(SampleError, match=r"bad\.tar.*broken"):
        protect_shards(protection, [shard], str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False,
                       engine="ray")


def _protections(tmp_path, request, kind: str, pngs: list[bytes], keys: list[str]):
    if kind == "convolution":
        return request.getfixturevalue("protection")
    if kind == "em-classwise":
        return _classwise()
    return _samplewise(tmp_path, [png_pixels(b) for b in pngs], keys)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["convolution", "em-classwise", "em-samplewise"])
def test_ray_data_adapter_gives_the_transform_pixels(ray_cluster, tmp_path, request, kind):
    from ue_datasets.apply.ray import ProtectBatches

    ray = ray_cluster
    pngs, labels = mixed_inputs()
    keys = [f"k{i}" for i in range(len(pngs))]
    protection = _protections(tmp_path, request, kind, pngs, keys)
    protection.save(tmp_path / "prot")
    protection = load_protection(tmp_path / "prot")
    transform = Protect(protection, keys_getter=lambda inputs: inputs[2])
    expected = {k: to_chw(transform(Image.open(io.BytesIO(b)), y, k)[0]) for b, y, k in zip(pngs, labels, keys)}

    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "s-000.tar",
                [{"__key__": k, "png": b, "cls": str(y).encode(), "txt": b"kept"} for k, b, y in zip(keys, pngs, labels)])
    one_actor = {"compute": ray.data.ActorPoolStrategy(size=1), "num_cpus": 0.5, "batch_size": 3}
    rows = ray.data.read_webdataset(str(tmp_path / "in"), decoder=None).map_batches(
        ProtectBatches, fn_constructor_kwargs={"protection": str(tmp_path / "prot"), "digest": protection.digest},
        **one_actor).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    for r in rows:
        assert torch.equal(png_pixels(r["png"]), expected[r["__key__"]])
        assert r["cls"] == str(labels[keys.index(r["__key__"])]).encode() and r["txt"] == b"kept"

    # parquet rows with Image-feature structs and a key column
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels, "id": keys}),
                   tmp_path / "t.parquet")
    rows = ray.data.read_parquet(str(tmp_path / "t.parquet")).map_batches(
        ProtectBatches, fn_constructor_kwargs={"protection": str(tmp_path / "prot"), "key_column": "id"},
        **one_actor).take_all()
    assert sorted(r["id"] for r in rows) == sorted(keys)
    for r in rows:
        assert r["image"]["path"] is None
        assert torch.equal(png_pixels(r["image"]["bytes"]), expected[r["id"]])


@pytest.mark.slow
def test_ray_data_output_written_with_write_webdataset_keeps_the_bytes(ray_cluster, tmp_path, prot):
    from ue_datasets.apply.ray import ProtectBatches

    ray = ray_cluster
    _shards(tmp_path / "in", count=1)
    ds = ray.data.read_webdataset(str(tmp_path / "in"), decoder=None).map_batches(
        ProtectBatches, fn_constructor_kwargs={"protection": prot}, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5, batch_size=8)
    rows = {r["__key__"]: r["png"] for r in ds.take_all()}
    ds.write_webdataset(str(tmp_path / "out"), encoder=None)
    written = {s["__key__"]: s["png"] for f in sorted((tmp_path / "out").glob("*.tar")) for s in read_tar(f)}
    assert written == rows


def test_engine_ray_without_ray_gives_the_install_command(tmp_path, prot, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    _shards(tmp_path / "in", count=1)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--engine", "ray") != 0
    assert 'pip install "ue-datasets[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # it failed before any work
    from ue_datasets import protect
    from ue_datasets.errors import UEDatasetsError

    with pytest.raises(UEDatasetsError, match=r'pip install "ue-datasets\[ray\]"'):
        protect(str(tmp_path / "in"), tmp_path / "out", prot, engine="ray", progress=False)
    assert not (tmp_path / "out").exists()


def test_ray_options_need_the_ray_engine(tmp_path, prot, capsys):
    _shards(tmp_path / "in", count=1)
    assert protect_cli("--protection", prot, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                       "--gpus-per-task", "0.5") != 0
    assert "--engine ray" in capsys.readouterr().err


@pytest.mark.slow
def test_clusters_feature_pass_on_ray_fits_what_the_local_pass_fits(ray_cluster, tmp_path):
    from ue_datasets.fit.clusters import fit_clusters

    _shards(tmp_path / "in", count=3, per=4)
    src = str(tmp_path / "in")
    options = {"clusters": 3, "mode": "blocks", "key": 1, "resolution": 8, "device": "cpu", "progress": False}
    local = fit_clusters(src, "pixels:8", cache_dir=tmp_path / "cache-local", **options)
    on_ray = fit_clusters(src, "pixels:8", cache_dir=tmp_path / "cache-ray", keep_cache=True, engine=RayEngine(),
                          **options)
    assert set(on_ray.tensors) == set(local.tensors)
    for name, t in local.tensors.items():
        assert torch.equal(on_ray.tensors[name], t), name
    parts = sorted((tmp_path / "cache-ray" / "features").glob("part-*.safetensors"))
    assert [p.name for p in parts] == [f"part-{i:05d}.safetensors" for i in range(3)]  # one part per file

    # a rerun reuses every complete part; a changed file is embedded again
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    write_shard(tmp_path / "in" / "shard-001.tar",
                [{"__key__": f"new-{i}", "png": mixed_inputs()[0][i], "cls": b"1"} for i in range(3)])
    again = fit_clusters(src, "pixels:8", cache_dir=tmp_path / "cache-ray", keep_cache=True, engine=RayEngine(),
                         **options)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache-ray" / "features").glob("part-*")}
    assert after["part-00000.safetensors"] == stamps["part-00000.safetensors"]
    assert after["part-00001.safetensors"] != stamps["part-00001.safetensors"]
    assert again.tensors["assignments"].shape[0] == 4 + 3 + 4
