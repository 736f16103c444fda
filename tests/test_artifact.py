"""The protection artifact: a safetensors file plus a JSON manifest, digest-checked, never pickled."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from conftest import make_samples, write_shard
from ue_datasets import ArtifactError, Protection, fit_convolution, load_protection, read_manifest
from ue_datasets.artifact import MANIFEST, TENSORS
from ue_datasets.version import ARTIFACT_FORMAT


@pytest.fixture
def saved(tmp_path, protection):
    return protection.save(tmp_path / "prot")


def _data_offset(path) -> int:
    """Byte offset where a safetensors file's tensor data starts (after the 8-byte length and header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n


def test_save_load_round_trip_keeps_method_params_tensors_and_digest(saved, protection):
    loaded = load_protection(saved)
    assert loaded.method == protection.method == "convolution"
    assert loaded.params == protection.params
    assert sorted(loaded.tensors) == sorted(protection.tensors) == ["filters", "fraction_salt"]
    for name, t in protection.tensors.items():
        assert loaded.tensors[name].dtype == t.dtype
        assert torch.equal(loaded.tensors[name], t)
    assert loaded.digest == protection.digest
    assert loaded.digest.startswith("sha256:") and len(loaded.digest) == len("sha256:") + 64
    assert read_manifest(saved)["digest"] == protection.digest


def test_saved_artifact_is_exactly_a_json_manifest_and_a_safetensors_file(saved, protection):
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST, TENSORS]
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == ARTIFACT_FORMAT
    assert manifest["method"] == "convolution"
    assert manifest["tensors"] == {
        "filters": {"dtype": "float32", "shape": [10, 3, 3]},
        "fraction_salt": {"dtype": "uint8", "shape": [32]},
    }
    from safetensors.torch import load_file

    raw = load_file(saved / TENSORS)
    assert torch.equal(raw["filters"], protection.tensors["filters"])


def test_loading_never_unpickles(saved, monkeypatch, protection):
    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load used while loading an artifact")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_protection(saved).digest == protection.digest


def test_digest_is_the_same_for_equal_protections_and_differs_for_other_keys():
    assert fit_convolution(10, key=5).digest == fit_convolution(10, key=5).digest
    assert fit_convolution(10, key=5).digest != fit_convolution(10, key=6).digest
    assert fit_convolution(10, key=5).digest != fit_convolution(10, key=5, quantize="round").digest


def test_tampered_tensor_byte_fails_with_digest_mismatch(saved):
    path = saved / TENSORS
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="digest"):
        load_protection(saved)


def test_tampered_manifest_params_fail(saved):
    path = saved / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["params"]["blur"] = 0.5
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="digest"):
        load_protection(saved)


def test_manifest_tensor_shapes_that_differ_from_the_file_fail(saved):
    path = saved / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["tensors"]["filters"]["shape"] = [11, 3, 3]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        load_protection(saved)


def test_truncated_tensor_file_fails(saved):
    path = saved / TENSORS
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 17])
    with pytest.raises(ArtifactError):
        load_protection(saved)


def test_missing_tensor_file_fails(saved):
    (saved / TENSORS).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_protection(saved)


def test_newer_format_version_fails_saying_newer(saved):
    path = saved / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        load_protection(saved)
    with pytest.raises(ArtifactError, match="newer"):
        read_manifest(saved)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something-else"}), json.dumps([1, 2])])
def test_manifest_that_is_not_ours_fails(saved, content):
    (saved / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError):
        load_protection(saved)


def test_missing_directory_fails(tmp_path):
    with pytest.raises(ArtifactError):
        load_protection(tmp_path / "does-not-exist")


def test_save_refuses_a_non_empty_directory_and_overwrite_replaces_only_an_artifact(tmp_path, protection,
                                                                                    other_protection):
    out = tmp_path / "prot"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not empty"):
        protection.save(out)
    with pytest.raises(ArtifactError, match="not a protection artifact"):
        protection.save(out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    assert not (out / MANIFEST).exists()
    (out / "keep.txt").unlink()
    protection.save(out)
    assert load_protection(out).digest == protection.digest
    other_protection.save(out, overwrite=True)
    assert load_protection(out).digest == other_protection.digest
    # No temporary siblings are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prot"]


def test_save_into_an_existing_empty_directory_works(tmp_path, protection):
    out = tmp_path / "empty"
    out.mkdir()
    protection.save(out)
    assert load_protection(out).digest == protection.digest


def test_to_device_keeps_the_digest(protection):
    moved = protection.to("cpu")
    assert isinstance(moved, Protection)
    assert moved.digest == protection.digest


def test_key_is_never_written_to_the_manifest_or_shard_stats(tmp_path):
    key = 123456789
    prot = fit_convolution(10, key=key)
    out = prot.save(tmp_path / "prot")
    assert str(key) not in (out / MANIFEST).read_text()
    assert str(key) not in json.dumps(prot.manifest())
    assert str(key) not in repr(prot)

    from ue_datasets.apply.shards import ShardOptions
    from ue_datasets.apply.wds import protect_shards

    shard = write_shard(str(tmp_path / "in.tar"), make_samples(2))
    protect_shards(prot, [shard], str(tmp_path / "out"), ShardOptions(device="cpu"), progress=False)
    stats = (tmp_path / "out" / "in_stats.json").read_text()
    assert prot.id in stats
    assert str(key) not in stats
    # The digest is a function of the key: publishing it would let anyone test key guesses offline.
    assert prot.digest.split(":")[1] not in stats
