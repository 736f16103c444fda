"""CUDA (method ``convolution``): filters from the key, and the apply kernel's pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ue_datasets import UEDatasetsError, fit_convolution, protect_batch
from ue_datasets.fit.convolution import draw_filters

# --------------------------------------------------------------------------- fit: methods.md 1.3

TEST_VECTORS = {
    0: [[0.164644, 0.214557, 1.000000], [0.163465, 0.127096, 0.193768], [0.131276, 0.267532, 0.289099]],
    1: [[1.000000, 0.079367, 0.232270], [0.136845, 0.170530, 0.005637], [0.185291, 0.183629, 0.185080]],
    2: [[0.075987, 1.000000, 0.073328], [0.047691, 0.033113, 0.196899], [0.041455, 0.058975, 0.110618]],
}
POSITIONS = [(0, 2), (0, 0), (0, 1), (0, 2), (2, 0), (0, 2), (2, 2), (0, 0), (1, 0), (1, 1)]
SUMS = [2.5514, 2.1786, 1.6381, 2.2380, 2.7113, 2.4742, 1.9255, 2.7315, 2.0447, 2.2321]


@pytest.fixture(scope="module")
def filters64():
    return draw_filters(10, key=0, kernel_size=3, blur=0.3)


def test_seed0_filters_of_classes_0_to_2_match_the_reference_test_vectors(protection, filters64):
    filters = protection.tensors["filters"]
    assert filters.dtype == torch.float32 and tuple(filters.shape) == (10, 3, 3)
    for c, expected in TEST_VECTORS.items():
        np.testing.assert_allclose(filters64[c], expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(filters[c].numpy(), expected, atol=1e-6, rtol=0)


def test_seed0_position_of_the_center_one_matches_the_reference_for_all_ten_classes(protection):
    filters = protection.tensors["filters"]
    for c, (r, q) in enumerate(POSITIONS):
        assert filters[c, r, q].item() == 1.0
        others = filters[c].clone()
        others[r, q] = 0
        assert (others >= 0).all() and (others < 0.3).all(), c


def test_seed0_filter_sums_match_the_reference_for_all_ten_classes(filters64):
    np.testing.assert_allclose(filters64.sum(axis=(1, 2)), SUMS, atol=1e-4, rtol=0)


def test_fit_is_deterministic_in_the_key():
    a, b = fit_convolution(10, key=7), fit_convolution(10, key=7)
    assert torch.equal(a.tensors["filters"], b.tensors["filters"])
    assert torch.equal(a.tensors["fraction_salt"], b.tensors["fraction_salt"])
    c = fit_convolution(10, key=8)
    assert not torch.equal(a.tensors["filters"], c.tensors["filters"])
    assert not torch.equal(a.tensors["fraction_salt"], c.tensors["fraction_salt"])


def test_universal_uses_class_zero_filter_for_every_class(protection):
    uni = fit_convolution(10, key=0, universal=True)
    filters = uni.tensors["filters"]
    for c in range(10):
        assert torch.equal(filters[c], protection.tensors["filters"][0])
    assert uni.params["universal"] is True
    assert uni.digest != protection.digest


def test_kernel_size_and_blur_shape_the_filters():
    p = fit_convolution(4, key=0, kernel_size=5, blur=0.06)
    f = p.tensors["filters"]
    assert tuple(f.shape) == (4, 5, 5)
    for c in range(4):
        assert (f[c] == 1.0).sum() == 1
        assert (f[c][f[c] != 1.0] < 0.06).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": -3},
        {"key": -1},
        {"key": 2**32},
        {"kernel_size": 2},
        {"kernel_size": 0},
        {"kernel_size": -3},
        {"blur": 0.0},
        {"blur": -0.1},
        {"blur": math.nan},
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"fraction": math.nan},
        {"quantize": "nearest"},
    ],
)
def test_invalid_fit_arguments_raise_uedatasets_error(kwargs):
    args = {"num_classes": 10, "key": 0, **kwargs}
    with pytest.raises(UEDatasetsError):
        fit_convolution(**args)


def test_key_range_ends_are_accepted():
    assert fit_convolution(2, key=0).tensors["filters"].shape[0] == 2
    assert fit_convolution(2, key=2**32 - 1).tensors["filters"].shape[0] == 2


# --------------------------------------------------------------------------- apply: pixels


def _impulse(channels: int, size: int = 9, value: int = 255) -> torch.Tensor:
    x = torch.zeros(1, channels, size, size, dtype=torch.uint8)
    x[:, :, size // 2, size // 2] = value
    return x


def _expected_impulse(filter_: torch.Tensor, size: int, quantize: str) -> np.ndarray:
    """The correlation of an impulse is the filter rotated by 180 degrees, divided by its max."""
    w = filter_.double().numpy()
    k = w.shape[0]
    scaled = np.flip(w, (0, 1)) / w.max() * 255
    window = np.floor(scaled + 0.5) if quantize == "round" else np.floor(scaled)
    out = np.zeros((size, size))
    lo = size // 2 - k // 2
    out[lo : lo + k, lo : lo + k] = window
    return out.astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("value", [255, 40])
def test_impulse_image_gives_flipped_class_filter_normalised_by_its_max(protection, channels, value):
    for c in range(10):
        out = protect_batch(protection, _impulse(channels, value=value), labels=[c])
        expected = _expected_impulse(protection.tensors["filters"][c], 9, "truncate")
        assert out.dtype == torch.uint8 and tuple(out.shape) == (1, channels, 9, 9)
        for ch in range(channels):
            np.testing.assert_array_equal(out[0, ch].numpy(), expected, err_msg=f"class {c} channel {ch}")
        # The filter's 1 lands on the rotated position and becomes the image max.
        r, q = POSITIONS[c]
        assert out[0, 0, 4 + 1 - r, 4 + 1 - q].item() == 255


def test_impulse_with_kernel_size_5_uses_padding_2():
    p = fit_convolution(3, key=11, kernel_size=5)
    for c in range(3):
        out = protect_batch(p, _impulse(3, size=11), labels=[c])
        expected = _expected_impulse(p.tensors["filters"][c], 11, "truncate")
        assert tuple(out.shape) == (1, 3, 11, 11)
        np.testing.assert_array_equal(out[0, 1].numpy(), expected)


def test_round_quantisation_rounds_half_up_where_truncation_floors(protection):
    rounded = fit_convolution(10, key=0, quantize="round")
    differs = 0
    for c in range(10):
        t = protect_batch(protection, _impulse(1), labels=[c])[0, 0].numpy().astype(int)
        r = protect_batch(rounded, _impulse(1), labels=[c])[0, 0].numpy().astype(int)
        np.testing.assert_array_equal(r, _expected_impulse(rounded.tensors["filters"][c], 9, "round"))
        assert ((r - t) >= 0).all() and ((r - t) <= 1).all()
        w = np.flip(rounded.tensors["filters"][c].double().numpy(), (0, 1)) * 255
        frac_high = (w - np.floor(w)) >= 0.5
        np.testing.assert_array_equal((r - t)[3:6, 3:6] == 1, frac_high)
        differs += int(frac_high.sum())
    assert differs > 0


def test_all_black_image_stays_black_without_nan(protection):
    x = torch.zeros(2, 3, 6, 7, dtype=torch.uint8)
    out = protect_batch(protection, x, labels=[0, 9])
    assert out.dtype == torch.uint8 and not out.any()
    xf = torch.zeros(2, 3, 6, 7)
    outf = protect_batch(protection, xf, labels=[0, 9])
    assert not torch.isnan(outf).any() and not outf.any()


def _reference(protection, x: torch.Tensor, labels, grayscale=False) -> torch.Tensor:
    """Independent float64 reference: depthwise conv2d (a correlation), / max, * 255, floor."""
    outs = []
    for img, y in zip(x, labels):
        w = protection.tensors["filters"][y].double()
        k = w.shape[0]
        c = img.shape[0]
        z = F.conv2d(img[None].double(), w.expand(c, 1, k, k), padding=k // 2, groups=c)
        if grayscale:
            z = z.mean(dim=1, keepdim=True).expand_as(z)
        outs.append(torch.floor(z / z.max() * 255).clamp(0, 255)[0])
    return torch.stack(outs)


def test_random_images_match_an_independent_float64_reference_within_one_level(protection):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (8, 3, 13, 11), dtype=torch.uint8, generator=g)
    labels = list(range(8))
    out = protect_batch(protection, x, labels=labels).double()
    ref = _reference(protection, x, labels)
    diff = (out - ref).abs()
    assert diff.max() <= 1
    assert (diff == 0).float().mean() > 0.99
    # Each protected image reaches 255 at its max (one scalar max over C, H, W).
    assert (out.amax(dim=(1, 2, 3)) == 255).all()


def test_grayscale_option_makes_all_channels_equal(protection):
    gray = fit_convolution(10, key=0, grayscale=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (4, 3, 10, 12), dtype=torch.uint8, generator=g)
    out = protect_batch(gray, x, labels=[1, 2, 3, 4])
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    ref = _reference(gray, x, [1, 2, 3, 4], grayscale=True)
    assert (out.double() - ref).abs().max() <= 1
    colour = protect_batch(protection, x, labels=[1, 2, 3, 4])
    assert not torch.equal(colour[:, 0], colour[:, 1])
