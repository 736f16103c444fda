"""The tensor core `protect_batch` and the codec path shared by the adapters (images, encoded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXIF_ROTATE_270, decode_display, encode, make_dataset, png_pixels, to_chw
from ue_datasets import SampleError, UEDatasetsError, fit_convolution, protect_batch
from ue_datasets.apply.core import identity_protection
from ue_datasets.apply.encoded import Item, protect_encoded
from ue_datasets.apply.images import ImageFormatError, decode, encode_png, pil_to_tensor, tensor_to_pil

# --------------------------------------------------------------------------- channels, dtype, device


def test_rgba_alpha_is_kept_byte_identical_and_colour_protected_as_rgb(protection):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (3, 4, 9, 9), dtype=torch.uint8, generator=g)
    out = protect_batch(protection, x, labels=[0, 1, 2])
    assert out.shape == x.shape
    assert torch.equal(out[:, 3], x[:, 3])
    assert torch.equal(out[:, :3], protect_batch(protection, x[:, :3].contiguous(), labels=[0, 1, 2]))
    assert not torch.equal(out[:, :3], x[:, :3])


def test_la_image_keeps_its_alpha_and_protects_luminance_as_l(protection):
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (2, 2, 9, 7), dtype=torch.uint8, generator=g)
    out = protect_batch(protection, x, labels=[3, 4])
    assert torch.equal(out[:, 1], x[:, 1])
    assert torch.equal(out[:, :1], protect_batch(protection, x[:, :1].contiguous(), labels=[3, 4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_input_in_unit_range_returns_float_of_the_uint8_result(protection, dtype):
    g = torch.Generator().manual_seed(7)
    u8 = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = protect_batch(protection, u8.to(dtype) / 255, labels=[0, 5, 9])
    assert out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1
    expected = protect_batch(protection, u8, labels=[0, 5, 9])
    assert torch.equal(out.mul(255).round().to(torch.uint8), expected)


def test_output_is_on_the_input_device_and_same_type(protection):
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = protect_batch(protection, x, labels=torch.tensor([1, 2]), device="cpu")
    assert isinstance(out, torch.Tensor) and out.device == x.device and out.dtype == x.dtype
    outs = protect_batch(protection, list(x), labels=[1, 2])
    assert isinstance(outs, list) and all(o.device == x.device for o in outs)
    assert protect_batch(protection, [], labels=[]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compute_returns_to_the_input_device(protection):
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    on_cpu = protect_batch(protection, x, labels=[0, 1, 2, 3])
    via_gpu = protect_batch(protection, x, labels=[0, 1, 2, 3], device="cuda")
    assert via_gpu.device.type == "cpu"
    on_gpu = protect_batch(protection, x.cuda(), labels=[0, 1, 2, 3])
    assert on_gpu.device.type == "cuda"
    assert (via_gpu.int() - on_cpu.int()).abs().max() <= 1
    assert torch.equal(on_gpu.cpu(), via_gpu)


# --------------------------------------------------------------------------- determinism


def _mixed(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(3, 8, 8), (3, 12, 10), (3, 5, 17)]
    images = [torch.randint(0, 256, sizes[i % 3], dtype=torch.uint8, generator=g) for i in range(n)]
    labels = torch.randint(0, 10, (n,), generator=g).tolist()
    return images, labels


def test_mixed_sizes_in_one_call_equal_one_image_at_a_time_and_any_batching(protection):
    images, labels = _mixed(37)
    together = protect_batch(protection, images, labels=labels)
    assert [t.shape for t in together] == [t.shape for t in images]
    for bs in (1, 5, 16):
        chunked = [o for s in range(0, 37, bs) for o in protect_batch(protection, images[s : s + bs], labels[s : s + bs])]
        assert all(torch.equal(a, b) for a, b in zip(chunked, together)) and len(chunked) == 37
    for img, y, out in zip(images, labels, together):
        alone = protect_batch(protection, [img], labels=[y])[0]
        assert torch.equal(alone, out)
        assert torch.equal(protect_batch(protection, img[None], labels=[y])[0], out)


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_batch_size_does_not_change_a_single_byte(protection, batch, monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (37, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (37,), generator=g)
    whole = protect_batch(protection, x, labels=labels)
    parts = torch.cat([protect_batch(protection, x[s : s + batch], labels=labels[s : s + batch])
                       for s in range(0, 37, batch)])
    assert torch.equal(whole, parts)
    # Chunking inside the kernel does not matter either.
    import ue_datasets.kernels.convolution as conv

    monkeypatch.setattr(conv, "_CPU_CHUNK_BYTES", 1)
    assert torch.equal(protect_batch(protection, x, labels=labels), whole)


# --------------------------------------------------------------------------- partial protection


def test_fraction_half_protects_roughly_half_chosen_by_key_only():
    full = fit_convolution(10, key=0)
    half = fit_convolution(10, key=0, fraction=0.5)
    n = 200
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    keys = [f"img-{i:04d}" for i in range(n)]
    out = protect_batch(half, x, labels=labels, keys=keys)
    protected = protect_batch(full, x, labels=labels)
    changed = torch.tensor([not torch.equal(out[i], x[i]) for i in range(n)])
    for i in range(n):
        assert torch.equal(out[i], protected[i]) or torch.equal(out[i], x[i])
    assert 60 <= int(changed.sum()) <= 140

    # Same keys, different order and batches: same selection and the same bytes per key.
    perm = torch.randperm(n, generator=g)
    shuffled = torch.cat([
        protect_batch(half, x[perm[s : s + 7]], labels=labels[perm[s : s + 7]], keys=[keys[i] for i in perm[s : s + 7]])
        for s in range(0, n, 7)
    ])
    assert torch.equal(shuffled, out[perm])

    # The choice depends on the key of each sample, not on its position or pixels.
    renamed = protect_batch(half, x, labels=labels, keys=[k + "x" for k in keys])
    assert not torch.equal(renamed, out)


def test_fraction_selection_depends_on_the_protection_key():
    from ue_datasets.apply.core import selected

    keys = [str(i) for i in range(100)]
    a = selected(fit_convolution(10, key=0, fraction=0.5), keys)
    b = selected(fit_convolution(10, key=1, fraction=0.5), keys)
    assert torch.equal(a, selected(fit_convolution(10, key=0, fraction=0.5), keys))
    assert not torch.equal(a, b)


def test_fraction_zero_changes_nothing_and_partial_protection_needs_keys():
    none = fit_convolution(10, key=0, fraction=0.0)
    x = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(protect_batch(none, x, labels=[0, 1, 2], keys=["a", "b", "c"]), x)
    with pytest.raises(UEDatasetsError, match="key"):
        protect_batch(fit_convolution(10, key=0, fraction=0.5), x, labels=[0, 1, 2])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("labels", [[0, 10], [-1, 0], [3, 99]])
def test_labels_out_of_range_raise(protection, labels):
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match="out of range"):
        protect_batch(protection, x, labels=labels)
    with pytest.raises(UEDatasetsError, match="out of range"):
        protect_batch(protection, list(x), labels=labels)


def test_missing_or_miscounted_labels_raise(protection):
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    with pytest.raises(UEDatasetsError, match="label"):
        protect_batch(protection, x)
    with pytest.raises(UEDatasetsError, match="labels"):
        protect_batch(protection, x, labels=[1, 2, 3])


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(3, 5, 5, dtype=torch.uint8),  # not a batch
        torch.zeros(1, 5, 5, 5, dtype=torch.uint8),  # 5 channels
        torch.zeros(1, 3, 5, 5, dtype=torch.int32),  # neither uint8 nor float
    ],
)
def test_malformed_images_raise(protection, x):
    with pytest.raises(UEDatasetsError):
        protect_batch(protection, x, labels=[0] * (x.shape[0] if x.ndim == 4 else 1))


def test_unknown_method_raises():
    from ue_datasets import Protection

    with pytest.raises(UEDatasetsError, match="unknown protection method"):
        protect_batch(Protection("nope", {}, {}), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_identity_protection_changes_no_pixel():
    x = torch.randint(0, 256, (2, 4, 6, 6), dtype=torch.uint8)
    assert torch.equal(protect_batch(identity_protection(), x), x)


# --------------------------------------------------------------------------- decoding and encoding


def _roundtrip_mode(img: Image.Image) -> Image.Image:
    return decode(encode(img, "PNG"))


def test_decode_keeps_l_la_rgb_rgba_modes():
    rng = np.random.default_rng(0)
    for mode, c in (("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4)):
        arr = rng.integers(0, 256, size=(5, 6, c) if c > 1 else (5, 6), dtype=np.uint8)
        img = Image.fromarray(arr, mode)
        out = _roundtrip_mode(img)
        assert out.mode == mode
        t = pil_to_tensor(out)
        assert tuple(t.shape) == (c, 5, 6)
        assert torch.equal(t, to_chw(img))


def test_decode_converts_palette_bilevel_and_cmyk_to_protectable_modes():
    rgb = make_dataset(1, seed=3)[0][0]
    pal = rgb.convert("P")
    assert _roundtrip_mode(pal).mode == "RGB"
    assert np.array_equal(np.asarray(_roundtrip_mode(pal)), np.asarray(pal.convert("RGB")))
    pal_t = rgb.convert("P")
    pal_t.info["transparency"] = 0
    assert _roundtrip_mode(pal_t).mode == "RGBA"
    assert _roundtrip_mode(rgb.convert("1")).mode == "L"
    assert decode(encode(rgb.convert("CMYK"), "JPEG")).mode == "RGB"


@pytest.mark.parametrize("mode_array", ["I;16", "F"])
def test_decode_refuses_16_bit_and_float_images(mode_array):
    if mode_array == "I;16":
        img = Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8))
        data = encode(img, "PNG")
    else:
        img = Image.fromarray(np.zeros((8, 8), dtype=np.float32))
        data = encode(img, "TIFF")
    with pytest.raises(ImageFormatError, match="not supported"):
        decode(data)


def test_decode_applies_exif_orientation():
    img = make_dataset(2)[0][1]
    assert img.size == (10, 12)
    data = encode(img, "JPEG", exif_orientation=EXIF_ROTATE_270)
    out = decode(data)
    assert out.size == (12, 10)
    assert np.array_equal(np.asarray(out), np.asarray(decode_display(data)))


@pytest.mark.parametrize("data", [b"", b"definitely not an image", None], ids=["empty", "garbage", "truncated_png"])
def test_undecodable_bytes_raise_image_format_error(data):
    if data is None:
        full = encode(make_dataset(1)[0][0], "PNG")
        data = full[: len(full) // 2]
    with pytest.raises(ImageFormatError, match="cannot decode"):
        decode(data)


def test_png_encoding_is_lossless_for_every_channel_count():
    for c in (1, 2, 3, 4):
        t = torch.randint(0, 256, (c, 7, 9), dtype=torch.uint8)
        assert torch.equal(png_pixels(encode_png(t)), t)
        assert torch.equal(pil_to_tensor(tensor_to_pil(t)), t)


# --------------------------------------------------------------------------- protect_encoded


def test_protect_encoded_equals_protect_batch_on_decoded_images(protection):
    images, labels = make_dataset(6, seed=4)
    items = [Item(f"k{i}", encode(im, "PNG"), y) for i, (im, y) in enumerate(zip(images, labels))]
    items.append(Item("pil", images[0], labels[0]))
    out = protect_encoded(protection, items, source="src", device="cpu")
    for item, png in zip(items, out):
        assert isinstance(png, bytes)
        img = item.image if isinstance(item.image, Image.Image) else decode_display(item.image)
        expected = protect_batch(protection, [to_chw(img)], labels=[item.label])[0]
        assert torch.equal(png_pixels(png), expected)


def test_protect_encoded_returns_a_sample_error_in_the_slot_of_each_bad_item(protection):
    good = encode(make_dataset(1)[0][0], "PNG")
    items = [
        Item("ok1", good, 1),
        Item("badimg", b"garbage", 1),
        Item("badlabel", good, 10),
        Item("strlabel", good, "3"),
        Item("boollabel", good, True),
        Item("nolabel", good, None),
        Item("ok2", good, 2),
    ]
    out = protect_encoded(protection, items, source="my-source", device="cpu")
    assert isinstance(out[0], bytes) and isinstance(out[-1], bytes)
    for item, res in zip(items[1:-1], out[1:-1]):
        assert isinstance(res, SampleError), item.key
        assert res.source == "my-source" and res.key == item.key
        assert "my-source" in str(res) and item.key in str(res)
    assert "out of range" in out[2].reason
    assert "not an integer" in out[3].reason
