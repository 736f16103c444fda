"""The noise bank: sharded safetensors of int8 levels, an index found by key and pixel checksum, memory-mapped."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ue_datasets.bank import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    DEFAULT_SHARD_BYTES,
    INDEX,
    MANIFEST,
    SHARD_OVERHEAD,
    Bank,
    BankWriter,
)
from ue_datasets.errors import ArtifactError, UEDatasetsError
from ue_datasets.kernels.samples import key_hashes, pixel_checksum

SHAPES = [(3, 8, 8), (1, 12, 10), (2, 5, 7), (3, 16, 16), (1, 1, 1)]
KEYS = ["a", "clé-é", "ключ/🙂", "日本語 key", "s000_00004", "", "tab\there", "0"]


def _entries(n: int, seed: int = 0):
    """``n`` (key, checksum (2,), levels int8 (C, H, W)) of cycling shapes and unicode keys."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        x = torch.randint(0, 256, (1, *shape), generator=g, dtype=torch.uint8)
        levels = torch.randint(-8, 9, shape, generator=g, dtype=torch.int8)
        out.append((f"{KEYS[i % len(KEYS)]}#{i}", pixel_checksum(x)[0], levels))
    return out


def _write(directory, entries, **kwargs) -> Bank:
    with BankWriter(directory, **kwargs) as w:
        for key, cs, lv in entries:
            w.add(key, cs, lv)
    return Bank.open(directory)


@pytest.fixture
def entries():
    return _entries(23)


@pytest.fixture
def bank(tmp_path, entries):
    return _write(tmp_path / "bank", entries)


def _check_all(bank: Bank, entries) -> None:
    keys = [k for k, _, _ in entries]
    sums = torch.stack([c for _, c, _ in entries])
    rows = bank.find(keys, sums)
    assert rows.dtype == torch.int64 and rows.shape == (len(entries),)
    assert (rows >= 0).all() and len(set(rows.tolist())) == len(entries)
    for (_, _, lv), got, r in zip(entries, bank.levels(rows), rows.tolist()):
        assert got.dtype == torch.int8 and torch.equal(got, lv)
        assert bank.shape(r) == tuple(lv.shape)


def test_round_trip_of_mixed_shapes_channels_and_unicode_keys(bank, entries):
    assert len(bank) == bank.entries == len(entries)
    assert bank.digest.startswith("sha256:") and len(bank.digest) == len("sha256:") + 64
    _check_all(bank, entries)
    m = json.loads((bank.directory / MANIFEST).read_text())
    assert m["format"] == BANK_FORMAT and m["format_version"] == BANK_FORMAT_VERSION
    assert m["entries"] == len(entries) and m["dtype"] == "int8" and m["shard_bytes"] == DEFAULT_SHARD_BYTES
    assert [s["file"] for s in m["shards"]] == ["deltas-00000.safetensors"]
    assert sorted(p.name for p in bank.directory.iterdir()) == sorted([MANIFEST, INDEX, "deltas-00000.safetensors"])


def test_add_batch_of_a_stacked_tensor_equals_adds_one_by_one(tmp_path):
    g = torch.Generator().manual_seed(3)
    levels = torch.randint(-128, 128, (10, 3, 4, 5), generator=g, dtype=torch.int8)
    x = torch.randint(0, 256, (10, 3, 4, 5), generator=g, dtype=torch.uint8)
    keys = [f"{i:08d}" for i in range(10)]
    with BankWriter(tmp_path / "batch", shard_bytes=SHARD_OVERHEAD + 150) as w:
        w.add_batch(keys[:7], pixel_checksum(x[:7]), levels[:7])
        w.add_batch(keys[7:], pixel_checksum(x[7:]), list(levels[7:]))
    one = _write(tmp_path / "one", [(k, c, lv) for k, c, lv in zip(keys, pixel_checksum(x), levels)],
                 shard_bytes=SHARD_OVERHEAD + 150)
    batch = Bank.open(tmp_path / "batch")
    assert batch.digest == one.digest  # the same bytes, file for file
    got = batch.levels(batch.find(keys, pixel_checksum(x)))
    assert torch.equal(torch.stack(got), levels)


def test_index_and_shards_are_plain_safetensors_in_the_documented_layout(bank, entries):
    with safe_open(str(bank.directory / INDEX), "pt") as f:
        idx = {n: f.get_tensor(n) for n in f.keys()}
    n = len(entries)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in idx.items()} == {
        "hashes": (torch.int64, (n,)), "shard": (torch.int32, (n,)), "offset": (torch.int64, (n,)),
        "shape": (torch.int32, (n, 3)), "checksum": (torch.int64, (n, 2))}
    assert torch.equal(idx["hashes"], idx["hashes"].sort().values)
    expected = np.array(key_hashes([k for k, _, _ in entries]), dtype=np.uint64).view(np.int64)
    assert sorted(idx["hashes"].tolist()) == sorted(expected.tolist())
    with safe_open(str(bank.directory / "deltas-00000.safetensors"), "pt") as f:
        assert list(f.keys()) == ["levels"]
        flat = f.get_tensor("levels")
    assert flat.dtype == torch.int8 and flat.dim() == 1
    r = int(bank.find([entries[3][0]], entries[3][1][None])[0])
    o, (c, h, w) = int(idx["offset"][r]), idx["shape"][r].tolist()
    assert torch.equal(flat[o: o + c * h * w].reshape(c, h, w), entries[3][2])


def test_find_gives_minus_one_for_a_missing_key_and_for_a_known_key_with_other_pixels(bank, entries):
    key, cs, _ = entries[5]
    other = cs.clone()
    other[1] += 1
    rows = bank.find([key, "no such key", key, entries[6][0]], torch.stack([other, cs, cs, cs]))
    assert rows[0] == -1 and rows[1] == -1 and rows[2] >= 0 and rows[3] == -1
    assert bank.find([], torch.zeros(0, 2, dtype=torch.int64)).shape == (0,)
    with pytest.raises(UEDatasetsError, match="not an entry"):
        bank.levels([-1])


def test_duplicate_keys_across_files_are_resolved_by_checksum(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 1, 6, 6), generator=g, dtype=torch.uint8)  # row "0" of three parquet files
    sums = pixel_checksum(x)
    levels = [torch.full((1, 6, 6), v, dtype=torch.int8) for v in (1, 2, 3)]
    with BankWriter(tmp_path / "b") as w:
        w.add_batch(["0", "1"], sums[:2], [levels[0], torch.zeros(3, 2, 2, dtype=torch.int8)])
        w.add("0", sums[1], levels[1])
        w.add("0", (int(sums[2, 0]), int(sums[2, 1])), levels[2])
    bank = Bank.open(tmp_path / "b")
    rows = bank.find(["0", "0", "0"], sums[[2, 0, 1]])
    assert [int(t[0, 0, 0]) for t in bank.levels(rows)] == [3, 1, 2]
    assert bank.find(["1"], sums[1:2])[0] >= 0 and bank.find(["1"], sums[:1])[0] == -1


def test_same_key_and_checksum_twice_is_refused_at_close_naming_the_key(tmp_path):
    cs = torch.tensor([5, 7])
    w = BankWriter(tmp_path / "b")
    zeros = torch.zeros(50, 1, 2, 2, dtype=torch.int8)
    w.add_batch([f"k{i}" for i in range(50)], torch.arange(100).reshape(50, 2), zeros)
    w.add("ключ", cs, torch.ones(1, 2, 2, dtype=torch.int8))
    w.add("ключ", cs, torch.zeros(1, 3, 3, dtype=torch.int8))
    with pytest.raises(UEDatasetsError, match="'ключ'"):
        w.close()
    assert not (tmp_path / "b").exists()  # nothing of it is kept


def test_shards_are_bounded_by_shard_bytes_unless_one_entry_is_bigger(tmp_path):
    bound = SHARD_OVERHEAD + 400
    entries = _entries(40) + [("big", torch.tensor([1, 2]), torch.ones(3, 20, 20, dtype=torch.int8))]
    entries += _entries(5, seed=9)
    bank = _write(tmp_path / "b", entries, shard_bytes=bound)
    shards = sorted(bank.directory.glob("deltas-*.safetensors"))
    m = json.loads((bank.directory / MANIFEST).read_text())
    assert len(shards) >= 5 and [s["file"] for s in m["shards"]] == [p.name for p in shards]
    for p, info in zip(shards, m["shards"]):
        assert p.stat().st_size == info["bytes"]
        assert info["bytes"] <= bound or info["entries"] == 1, info
    assert any(info["bytes"] > bound and info["entries"] == 1 for info in m["shards"])
    _check_all(bank, entries)


def test_open_does_not_read_shards_but_verify_reports_a_truncated_one(tmp_path, entries, monkeypatch):
    bank = _write(tmp_path / "b", entries, shard_bytes=SHARD_OVERHEAD + 300)
    bank.verify()
    victim = bank.directory / "deltas-00001.safetensors"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 7)
    reads = []
    real_open = open

    def spy(path, *args, **kwargs):
        reads.append(os.path.basename(str(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    reopened = Bank.open(bank.directory)
    monkeypatch.undo()
    assert not [r for r in reads if r.startswith("deltas-")]
    assert reopened.digest == bank.digest and len(reopened) == len(entries)
    with pytest.raises(ArtifactError, match="deltas-00001.safetensors"):
        reopened.verify()
    # Entries of intact shards are still read; one of the truncated shard is refused by name.
    shard_of = np.asarray(reopened._index["shard"])
    assert reopened.levels([int(np.flatnonzero(shard_of == 0)[0])])
    with pytest.raises(ArtifactError, match="deltas-00001.safetensors"):
        reopened.levels([int(np.flatnonzero(shard_of == 1)[0])])


def test_verify_names_a_modified_shard_or_index(tmp_path, entries):
    bank = _write(tmp_path / "b", entries)
    shard = bank.directory / "deltas-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="deltas-00000.safetensors.*sha256"):
        Bank.open(bank.directory).verify()
    shard.write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 1]))
    Bank.open(bank.directory).verify()
    index = bank.directory / INDEX
    raw = bytearray(index.read_bytes())
    raw[-1] ^= 1
    index.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=INDEX):
        Bank.open(bank.directory).verify()


def test_a_tampered_manifest_changes_the_digest(bank):
    path = bank.directory / MANIFEST
    m = json.loads(path.read_text())
    m["shards"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    assert Bank.open(bank.directory).digest != bank.digest
    with pytest.raises(ArtifactError, match="deltas-00000.safetensors"):
        Bank.open(bank.directory).verify()


def test_open_refuses_other_formats_newer_versions_and_missing_files_naming_the_path(tmp_path, bank):
    path = bank.directory / MANIFEST
    good = path.read_text()
    for change, pattern in [({"format": "ue-datasets-protection"}, "not a ue-datasets noise bank"),
                            ({"format_version": BANK_FORMAT_VERSION + 1}, "newer"),
                            ({"entries": 3}, "add up"),
                            ({"index": {"file": "../x", "sha256": "", "bytes": 1}}, "invalid file name")]:
        path.write_text(json.dumps({**json.loads(good), **change}))
        with pytest.raises(ArtifactError, match=pattern) as e:
            Bank.open(bank.directory)
        assert str(path) in str(e.value)
    path.write_text(good)
    (bank.directory / "deltas-00000.safetensors").rename(tmp_path / "away")
    with pytest.raises(ArtifactError, match="deltas-00000.safetensors: missing"):
        Bank.open(bank.directory)
    (tmp_path / "away").rename(bank.directory / "deltas-00000.safetensors")
    (bank.directory / INDEX).unlink()
    with pytest.raises(ArtifactError, match="index.safetensors: missing"):
        Bank.open(bank.directory)
    with pytest.raises(ArtifactError, match="no such bank directory"):
        Bank.open(tmp_path / "nowhere")


def test_an_interrupted_writer_leaves_no_openable_bank(tmp_path, entries):
    target = tmp_path / "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        with BankWriter(target, shard_bytes=SHARD_OVERHEAD + 200) as w:
            for key, cs, lv in entries:
                w.add(key, cs, lv)
            assert len(list(target.glob("deltas-*"))) > 1  # streamed to disk as they came
            raise RuntimeError("interrupted")
    with pytest.raises(ArtifactError):
        Bank.open(target)
    assert not target.exists()
    # In a directory that existed (empty) before, the writer removes only what it made.
    target.mkdir()
    with pytest.raises(RuntimeError):
        with BankWriter(target) as w:
            w.add(*entries[0])
            raise RuntimeError("interrupted")
    assert target.is_dir() and not list(target.iterdir())


def test_an_existing_non_empty_directory_is_refused_and_left_untouched(tmp_path, entries):
    target = tmp_path / "b"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    with pytest.raises(UEDatasetsError, match="not empty"):
        BankWriter(target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"] and (target / "precious.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UEDatasetsError, match="not a directory"):
        BankWriter(tmp_path / "file")
    with pytest.raises(UEDatasetsError, match="not empty"):
        _write(tmp_path / "ok", entries[:2]).copy_to(target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"]


def test_writer_refuses_levels_that_are_not_int8_chw(tmp_path):
    with BankWriter(tmp_path / "b") as w:
        for bad in (torch.zeros(1, 2, 2), torch.zeros(4, 2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int8)):
            with pytest.raises(UEDatasetsError, match="levels"):
                w.add("k", (1, 2), bad)
        with pytest.raises(UEDatasetsError, match="checksum"):
            w.add("k", (1, 2, 3), torch.zeros(1, 2, 2, dtype=torch.int8))
    assert len(Bank.open(tmp_path / "b")) == 0


def test_an_empty_bank_opens_and_finds_nothing(tmp_path):
    bank = BankWriter(tmp_path / "b").close()
    assert len(bank) == 0 and bank.find(["a"], torch.zeros(1, 2, dtype=torch.int64)).tolist() == [-1]
    bank.verify()


def _levels_in_worker(bank: Bank, keys, sums):
    """Runs in a spawned process: the bank arrives pickled and is reopened there."""
    return [t.tolist() for t in bank.levels(bank.find(keys, sums))], bank.digest


def test_a_pickled_bank_reopens_in_a_spawned_worker_with_the_same_levels(bank, entries):
    state = pickle.dumps(bank)
    assert len(state) < 500  # the directory, never the maps
    assert pickle.loads(state).digest == bank.digest
    keys = [k for k, _, _ in entries]
    sums = torch.stack([c for _, c, _ in entries])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got, digest = pool.apply(_levels_in_worker, (bank, keys, sums))
    assert digest == bank.digest
    assert got == [t.tolist() for t in bank.levels(bank.find(keys, sums))]


def test_lookups_from_several_threads_agree(tmp_path):
    entries = _entries(60)
    bank = _write(tmp_path / "b", entries, shard_bytes=SHARD_OVERHEAD + 500)
    keys = [k for k, _, _ in entries]
    sums = torch.stack([c for _, c, _ in entries])
    fresh = Bank.open(bank.directory)  # no shard mapped yet: the threads race to map them
    errors, results = [], []

    def work():
        try:
            for _ in range(5):
                results.append([t.tolist() for t in fresh.levels(fresh.find(keys, sums))])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = [lv.tolist() for _, _, lv in entries]
    assert all(r == expected for r in results) and len(results) == 20


def test_copy_to_gives_an_equal_digest_and_the_same_entries(tmp_path, bank, entries):
    copy = bank.copy_to(tmp_path / "copy")
    assert copy.digest == bank.digest and copy.directory == tmp_path / "copy"
    copy.verify()
    _check_all(copy, entries)
    for f in bank.directory.iterdir():  # hard links or copies: the same bytes either way
        assert (copy.directory / f.name).read_bytes() == f.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bank.copy_to(empty).digest == bank.digest
