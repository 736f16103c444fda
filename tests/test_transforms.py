"""The torchvision v2 adapter: `Protect` on PIL, tv_tensors and tensors, and `ProtectBatch`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from conftest import make_dataset, to_chw
from ue_datasets import UEDatasetsError, fit_convolution, protect_batch
from ue_datasets.transforms import Protect, ProtectBatch


def test_protect_on_pil_returns_pil_with_the_core_pixels(protection):
    images, labels = make_dataset(6)
    t = Protect(protection)
    for img, label in zip(images, labels):
        out, out_label = t(img, label)
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out_label == label
        assert torch.equal(to_chw(out), protect_batch(protection, to_chw(img)[None], [label])[0])


def test_protect_on_tv_tensor_keeps_type_and_dict_structure(protection):
    img = tv_tensors.Image(torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8))
    out = Protect(protection)({"image": img, "label": 4, "meta": torch.tensor([1.0])})
    assert isinstance(out["image"], tv_tensors.Image)
    assert torch.equal(out["meta"], torch.tensor([1.0]))  # plain tensors beside a tv_tensor are not images
    assert torch.equal(out["image"].as_subclass(torch.Tensor), protect_batch(protection, img[None], [4])[0])


def test_protect_on_float_tensor_returns_float_in_unit_range(protection):
    x = torch.rand(3, 8, 8)
    out, _ = Protect(protection)(x, 2)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    ref = protect_batch(protection, x.mul(255).round().to(torch.uint8)[None], [2])[0]
    assert torch.equal(out.mul(255).round().to(torch.uint8), ref)


def test_protect_on_batched_tensor_uses_one_label_per_image(protection):
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4])
    out, same = Protect(protection)(x, labels)
    assert same is labels
    for i in range(5):
        assert torch.equal(out[i], protect_batch(protection, x[i : i + 1], labels[i : i + 1])[0])


def test_protect_keeps_alpha_of_rgba_and_turns_palette_into_rgb(protection):
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    out, _ = Protect(protection)(rgba, 1)
    assert out.mode == "RGBA"
    assert np.array_equal(np.asarray(out)[..., 3], np.asarray(rgba)[..., 3])
    palette = rgba.convert("RGB").convert("P")
    out, _ = Protect(protection)(palette, 1)
    assert out.mode == "RGB"
    assert torch.equal(to_chw(out), protect_batch(protection, to_chw(palette.convert("RGB"))[None], [1])[0])


def test_protect_composes_in_v2_pipeline_and_dataloader(protection):
    images, labels = make_dataset(8, sizes=[(8, 8)])

    class Pairs(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return pipeline(images[i], labels[i])

    pipeline = v2.Compose([Protect(protection), v2.ToImage(), v2.ToDtype(torch.uint8)])
    batch_x, batch_y = next(iter(DataLoader(Pairs(), batch_size=8, num_workers=0)))
    ref = protect_batch(protection, torch.stack([to_chw(im) for im in images]), labels)
    assert torch.equal(batch_x, ref) and batch_y.tolist() == labels


def test_protect_batch_as_collate_fn_matches_the_transform(protection):
    images, labels = make_dataset(6, sizes=[(8, 8)])
    samples = [(to_chw(im), y) for im, y in zip(images, labels)]
    pb = ProtectBatch(protection)
    x, y = next(iter(DataLoader(samples, batch_size=6, collate_fn=pb.collate)))
    per_sample = torch.stack([Protect(protection)(im, lab)[0] for im, lab in samples])
    assert torch.equal(x, per_sample) and y.tolist() == labels


def test_protect_without_label_gives_clear_error(protection):
    with pytest.raises(UEDatasetsError, match="labels"):
        Protect(protection)(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_partial_protection_needs_keys_getter_and_uses_it():
    p = fit_convolution(10, key=3, fraction=0.5)
    x = torch.randint(1, 256, (3, 6, 6), dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match="keys_getter"):
        Protect(p)(x, 1)
    t = Protect(p, keys_getter=lambda inputs: inputs[2])
    changed = {k for k in map(str, range(40)) if not torch.equal(t(x, 1, k)[0], x)}
    assert 5 < len(changed) < 35
    assert changed == {k for k in map(str, range(40)) if not torch.equal(t(x, 1, k)[0], x)}


def test_protect_loads_an_artifact_directory(tmp_path, protection):
    protection.save(tmp_path / "p")
    x = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    assert torch.equal(Protect(tmp_path / "p")(x, 3)[0], Protect(protection)(x, 3)[0])


def test_protected_dataset_wraps_image_label_pairs(protection):
    from ue_datasets.transforms import ProtectedDataset

    images, labels = make_dataset(4)
    wrapped = ProtectedDataset(list(zip(images, labels)), protection, then=v2.PILToTensor())
    assert len(wrapped) == 4
    for i in range(4):
        x, y = wrapped[i]
        assert y == labels[i] and torch.equal(x, protect_batch(protection, to_chw(images[i])[None], [y])[0])


def test_protected_dataset_protects_a_dataloader_batch_in_one_core_call(protection, monkeypatch):
    import ue_datasets.transforms.protect as module
    from ue_datasets.transforms import ProtectedDataset

    calls = []
    monkeypatch.setattr(module, "protect_batch", lambda *a, **k: calls.append(1) or protect_batch(*a, **k))
    images, labels = make_dataset(6, sizes=[(8, 8)])
    wrapped = ProtectedDataset(list(zip(images, labels)), protection, then=v2.PILToTensor())
    x, y = next(iter(DataLoader(wrapped, batch_size=6)))
    assert calls == [1]
    assert torch.equal(x, protect_batch(protection, torch.stack([to_chw(im) for im in images]), labels))
    assert y.tolist() == labels


def test_protected_dataset_batch_fetch_equals_sample_fetch_for_mixed_images_and_partial_protection():
    from ue_datasets.transforms import ProtectedDataset

    p = fit_convolution(10, key=3, fraction=0.5)
    images, labels = make_dataset(9)  # three sizes
    items = [(im if i % 3 else tv_tensors.Image(to_chw(im)), torch.tensor(y))
             for i, (im, y) in enumerate(zip(images, labels))]
    items.append((torch.rand(3, 8, 8), 2))  # a plain float tensor
    wrapped = ProtectedDataset(items, p)
    order = [9, 4, 0, 7, 1, 8, 2, 6, 3, 5]
    for (got, got_label), want_index in zip(wrapped.__getitems__(order), order):
        want, want_label = wrapped[want_index]
        assert type(got) is type(want) and got_label is items[want_index][1] and want_label is got_label
        assert torch.equal(to_chw(got), to_chw(want)) if isinstance(got, Image.Image) else torch.equal(got, want)
    changed = [not torch.equal(to_chw(images[i]), to_chw(wrapped[i][0])) for i in range(1, 9) if i % 3]
    assert any(changed) and not all(changed)  # the fraction keys on the sample index in both paths
