"""The additive-noise path: one kernel, pluggable lookups, noise banks through the adapters (their pixels agree:
`tests/test_adapters_agree.py`)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import mixed_inputs, png_pixels, read_tar, write_shard
from ue_datasets.apply.core import method_of, needs_keys, needs_labels, protect_batch, uses_keys
from ue_datasets.apply.noise import LOOKUPS, register_lookup
from ue_datasets.artifact import Protection, load_protection
from ue_datasets.bank import Bank, BankWriter
from ue_datasets.cli import main
from ue_datasets.errors import UEDatasetsError
from ue_datasets.kernels.noise import add_delta
from ue_datasets.kernels.samples import colour_planes, pixel_checksum

EPS = 8 / 255


def _classwise(num_classes: int = 10, channels: int = 3, size: int = 8, seed: int = 0, **params) -> Protection:
    g = torch.Generator().manual_seed(seed)
    deltas = (torch.rand(num_classes, channels, size, size, generator=g) * 2 - 1) * EPS
    return Protection("em", {"lookup": "class", "num_classes": num_classes, "eps": EPS, "rounding": "half-up",
                             "legacy_clamp": False, **params}, {"deltas": deltas})


def _samplewise(tmp_path, images: list[torch.Tensor], keys: list[str], seed: int = 0) -> Protection:
    """A sample-wise protection whose bank holds random levels in [-8, 8] for ``images`` (uint8 (C, H, W))."""
    g = torch.Generator().manual_seed(seed)
    with BankWriter(tmp_path / "bank-src") as writer:
        for key, im in zip(keys, images):
            c = colour_planes(im)
            writer.add(key, pixel_checksum(c[None])[0], torch.randint(-8, 9, c.shape, generator=g, dtype=torch.int8))
    bank = Bank.open(tmp_path / "bank-src")
    return Protection("em", {"lookup": "key", "mode": "samplewise", "eps": EPS, "rounding": "half-up",
                             "bank": {"entries": bank.entries, "digest": bank.digest}}, {}, bank=bank)


def test_integer_levels_give_the_same_bytes_as_the_float_delta_they_quantise():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 9, 7), generator=g, dtype=torch.uint8)
    delta = (torch.rand(16, 3, 9, 7, generator=g) * 2 - 1) * EPS
    levels = torch.floor(delta * 255 + 0.5).to(torch.int8)
    assert torch.equal(add_delta(x, delta), add_delta(x, levels))


def test_class_lookup_adds_each_labels_delta_clamped_and_rounded_half_up():
    p = _classwise(num_classes=3, size=4)
    x = torch.randint(0, 256, (6, 3, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    expected = ((x.float() / 255 + p.tensors["deltas"][labels]).clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)
    assert torch.equal(protect_batch(p, x, labels=labels), expected)
    assert (protect_batch(p, x, labels=labels).int() - x.int()).abs().max() <= round(255 * EPS)
    assert needs_labels(p) and not needs_keys(p) and not uses_keys(p)


def test_legacy_clamp_drops_the_negative_half_and_truncates():
    p = _classwise(num_classes=2, size=4, legacy_clamp=True, rounding="truncate")
    x = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    out = protect_batch(p, x, labels=labels)
    expected = (100 + (p.tensors["deltas"][labels].clamp(min=0) * 255)).floor().to(torch.uint8)
    assert torch.equal(out, expected)
    assert bool((out >= x).all())


def test_a_stored_delta_is_resized_nearest_to_each_image_and_channels_matched():
    p = _classwise(num_classes=1, channels=3, size=4)
    gray = torch.full((1, 1, 8, 8), 128, dtype=torch.uint8)
    out = protect_batch(p, gray, labels=[0])
    d = torch.nn.functional.interpolate(p.tensors["deltas"], size=(8, 8), mode="nearest").mean(1, keepdim=True)
    assert torch.equal(out, ((128 / 255 + d).clamp(0, 1).mul(255).add(0.5).floor()).to(torch.uint8))


def test_an_unknown_lookup_is_named_with_the_registered_ones_and_names_register_once():
    p = Protection("em", {"lookup": "telepathy"}, {})
    with pytest.raises(UEDatasetsError, match=r"telepathy.*\['class', 'cluster', 'key', 'text', 'text-sample'\]"):
        method_of(p)
    with pytest.raises(ValueError, match="already has a function"):
        register_lookup("class")(lambda protection, x: x)
    assert set(LOOKUPS) >= {"class", "cluster", "key", "text", "text-sample"}


def test_key_lookup_finds_each_samples_own_noise_after_shuffling(tmp_path):
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)
              for c, h, w in [(3, 8, 8), (1, 6, 10), (3, 8, 8), (1, 5, 5)]]
    keys = ["a", "b", "c", "d"]
    p = _samplewise(tmp_path, images, keys)
    assert needs_keys(p) and not needs_labels(p)
    alone = [protect_batch(p, [im], keys=[k])[0] for im, k in zip(images, keys)]
    order = [2, 0, 3, 1]
    shuffled = protect_batch(p, [images[i] for i in order], keys=[keys[i] for i in order])
    for j, i in enumerate(order):
        assert torch.equal(shuffled[j], alone[i])
    assert all(not torch.equal(a, im) for a, im in zip(alone, images))


def test_a_sample_missing_from_the_bank_is_named_or_passes_unprotected(tmp_path):
    g = torch.Generator().manual_seed(4)
    images = [torch.randint(0, 256, (3, 6, 6), generator=g, dtype=torch.uint8) for _ in range(3)]
    p = _samplewise(tmp_path, images[:2], ["a", "b"])
    with pytest.raises(UEDatasetsError, match=r"no noise for 1 of these samples \(keys \['zz'\]\)"):
        protect_batch(p, torch.stack(images), keys=["a", "b", "zz"])
    with pytest.raises(UEDatasetsError, match=r"keys \['b'\]"):  # a known key with other pixels
        protect_batch(p, torch.stack([images[0], images[2]]), keys=["a", "b"])
    out = protect_batch(p, torch.stack(images), keys=["a", "b", "zz"], unfitted="pass")
    assert torch.equal(out[2], images[2]) and not torch.equal(out[0], images[0])


def test_a_bank_protection_saves_loads_and_checks_its_banks_digest(tmp_path):
    images = [torch.randint(0, 256, (3, 6, 6), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)]
    p = _samplewise(tmp_path, images, ["a"])
    p.save(tmp_path / "art")
    loaded = load_protection(tmp_path / "art")
    assert loaded.digest == p.digest and loaded.bank.entries == 1
    assert torch.equal(protect_batch(loaded, images, keys=["a"])[0], protect_batch(p, images, keys=["a"])[0])
    manifest = tmp_path / "art" / "bank" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["entries"] = 2
    manifest.write_text(json.dumps(data))
    with pytest.raises(Exception, match="digest mismatch|entries"):
        load_protection(tmp_path / "art")


def test_shards_count_samples_passed_unprotected_and_fail_or_skip_them_otherwise(tmp_path):
    pngs, labels = mixed_inputs()
    keys = [str(i) for i in range(len(pngs))]
    protection = _samplewise(tmp_path, [png_pixels(b) for b in pngs[:8]], keys[:8])
    protection.save(tmp_path / "prot")
    (tmp_path / "in").mkdir()
    shard = write_shard(tmp_path / "in" / "s-000.tar",
                        [{"__key__": k, "png": b, "cls": str(y).encode()} for k, b, y in zip(keys, pngs, labels)])
    common = ["protect", "--protection", str(tmp_path / "prot"), "--input", shard, "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "fail")]) != 0
    assert main([*common, "--output", str(tmp_path / "pass"), "--unfitted", "pass"]) == 0
    stats = json.loads((tmp_path / "pass" / "s-000_stats.json").read_text())
    assert (stats["written"], stats["protected"], stats["unprotected"]) == (12, 8, 4)
    passed = [png_pixels(s["png"]) for s in read_tar(tmp_path / "pass" / "s-000.tar")][8:]
    assert all(torch.equal(a, png_pixels(b)) for a, b in zip(passed, pngs[8:]))
    assert main([*common, "--output", str(tmp_path / "skip"), "--on-error", "skip", "--max-skipped", "50%"]) == 0
    stats = json.loads((tmp_path / "skip" / "s-000_stats.json").read_text())
    assert stats["written"] == 8 and sorted(s["key"] for s in stats["skipped"]) == sorted(keys[8:])


def test_unlearnable_clusters_pixels_are_the_formula_the_old_kernel_computed():
    from ue_datasets.kernels.samples import encode_keys

    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (5, 3, 10, 14), generator=g, dtype=torch.uint8)
    deltas = (torch.rand(3, 3, 8, 8, generator=g) * 2 - 1) * (16 / 255)
    clusters = torch.tensor([2, 0, 1, 1, 2])
    keys = [f"s{i}" for i in range(5)]
    keys_utf8, key_offsets = encode_keys(keys)
    p = Protection("clusters", {"num_clusters": 3, "eps": 16 / 255, "encoder": {}},
                   {"centers": torch.zeros(3, 4), "deltas": deltas, "assignments": clusters,
                    "checksums": pixel_checksum(x), "keys_utf8": keys_utf8, "key_offsets": key_offsets})
    d = torch.nn.functional.interpolate(deltas[clusters], size=(10, 14), mode="nearest")
    expected = x.float().div(255).add(d).clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    assert torch.equal(protect_batch(p, x, keys=keys), expected)


def test_key_lookup_survives_resharding_and_the_batch_loader(tmp_path):
    from ue_datasets.apply.wds import protect_shards
    from ue_datasets.transforms import ProtectBatch

    pngs, labels = mixed_inputs()
    pngs, labels = pngs[:9:3], labels[:9:3]  # same-size RGB images, so they stack into one batch
    keys = [f"k{i}" for i in range(len(pngs))]
    protection = _samplewise(tmp_path, [png_pixels(b) for b in pngs], keys)
    samples = [{"__key__": k, "png": b, "cls": str(y).encode()} for k, b, y in zip(keys, pngs, labels)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = [write_shard(tmp_path / "one" / "all.tar", samples)]
    two = [write_shard(tmp_path / "two" / "a.tar", samples[2:]), write_shard(tmp_path / "two" / "b.tar", samples[:2])]
    protect_shards(protection, one, str(tmp_path / "out1"), progress=False)
    protect_shards(protection, two, str(tmp_path / "out2"), progress=False)
    by_key = {s["__key__"]: png_pixels(s["png"]) for s in read_tar(tmp_path / "out1" / "all.tar")}
    for name in ("a.tar", "b.tar"):
        for s in read_tar(tmp_path / "out2" / name):
            assert torch.equal(png_pixels(s["png"]), by_key[s["__key__"]])
    batch = [(png_pixels(b), y, k) for b, y, k in zip(pngs, labels, keys)]
    images, _ = ProtectBatch(protection).collate(batch)
    assert all(torch.equal(images[i], by_key[k]) for i, k in enumerate(keys))


@pytest.mark.slow
def test_spawned_workers_find_each_samples_noise_in_the_bank(tmp_path):
    from ue_datasets.apply.wds import protect_shards

    pngs, labels = mixed_inputs()
    keys = [f"k{i}" for i in range(len(pngs))]
    protection = _samplewise(tmp_path, [png_pixels(b) for b in pngs], keys)
    protection.save(tmp_path / "prot")
    samples = [{"__key__": k, "png": b, "cls": str(y).encode()} for k, b, y in zip(keys, pngs, labels)]
    (tmp_path / "in").mkdir()
    shards = [write_shard(tmp_path / "in" / f"s-{i}.tar", samples[i::2]) for i in range(2)]
    protect_shards(str(tmp_path / "prot"), shards, str(tmp_path / "one"), progress=False)
    protect_shards(str(tmp_path / "prot"), shards, str(tmp_path / "two"), workers=2, progress=False)
    for name in ("s-0.tar", "s-1.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
