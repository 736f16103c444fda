"""Audit defences: each data defence does what its source does, keeps shape and dtype, and specs parse."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ue_datasets.audit.defenses import (
    DATA_DEFENSES,
    DEFENSE_NAMES,
    Defense,
    augment_pad,
    bit_depth,
    gaussian_blur,
    grayscale,
    jpeg,
    median_filter,
    parse_defense,
    parse_defenses,
    random_crop_flip,
    upload,
)
from ue_datasets.errors import UEDatasetsError


def images(n: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def smooth_images(n: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth colour gradients (compress well, so high-quality JPEG nearly preserves them)."""
    r = torch.linspace(0, 255, size)
    planes = [
        r[None, :] * 0.6 + r[:, None] * 0.4,
        r[None, :] * 0.3 + r[:, None] * 0.5 + 30,
        255 - r[None, :] * 0.5 - r[:, None] * 0.4,
    ]
    return torch.stack(planes).round().to(torch.uint8)[None].repeat(n, 1, 1, 1)


# ------------------------------------------------------------------------------------------ data defences


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize(
    "spec", ["jpeg", "jpeg:50", "grayscale", "bdr", "median", "median:5", "blur", "blur:1.0", "upload"]
)
def test_every_data_defense_keeps_shape_and_dtype(spec, c):
    x = images(3, c, 12, 10)
    before = x.clone()
    y = parse_defense(spec).apply(x, 0)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(x, before), "the input must not be modified in place"


def test_jpeg_quality_10_changes_pixels_and_quality_100_nearly_preserves_them():
    x = smooth_images()
    low, high = jpeg(x, 10), jpeg(x, 100)
    err_low = (low.int() - x.int()).abs().float().mean()
    err_high = (high.int() - x.int()).abs().float().mean()
    assert err_low > 1.0
    assert err_high < 1.0 and err_high < err_low / 4
    assert torch.equal(jpeg(x, 10), low)  # deterministic
    grey = x[:, :1]
    assert (jpeg(grey, 100).int() - grey.int()).abs().max() <= 1


def test_jpeg_matches_a_pil_round_trip():
    x = images(2, 3, 16, 16)
    arr = x[1].permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=10)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(jpeg(x, 10)[1].permute(1, 2, 0).numpy(), ref)


def test_grayscale_gives_equal_channels_matching_pil_convert_l():
    x = images(3, 3, 16, 16, seed=1)
    y = grayscale(x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    for i in range(x.shape[0]):
        ref = np.asarray(Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L"))
        assert np.array_equal(y[i, 0].numpy(), ref)


def test_grayscale_is_the_identity_for_one_channel():
    x = images(2, 1)
    assert torch.equal(grayscale(x), x)


def test_bit_depth_keeps_only_the_top_bits():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = bit_depth(x, 2)
    assert set(y.unique().tolist()) == {0, 64, 128, 192}
    assert torch.equal(y, x & 0xC0)
    assert torch.equal(bit_depth(x, 3), x & 0xE0)
    assert torch.equal(bit_depth(x, 8), x)


def test_median_removes_a_single_salt_pixel():
    x = torch.full((1, 3, 9, 9), 50, dtype=torch.uint8)
    x[0, 1, 4, 4] = 255
    assert torch.equal(median_filter(x, 3), torch.full_like(x, 50))


def test_median_matches_a_direct_window_median_with_reflect_padding():
    x = images(1, 1, 7, 6, seed=3)
    y = median_filter(x, 3)
    padded = np.pad(x[0, 0].numpy(), 1, mode="reflect")
    ref = np.array([[np.median(padded[i : i + 3, j : j + 3]) for j in range(6)] for i in range(7)])
    assert np.array_equal(y[0, 0].numpy(), ref.astype(np.uint8))


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_median_matches_torch_median_over_reflect_padded_windows(kernel):
    x = images(5, 3, 13, 11, seed=4)
    p = kernel // 2
    padded = torch.nn.functional.pad(x.float().reshape(-1, 1, 13, 11), (p, p, p, p), mode="reflect")
    ref = torch.nn.functional.unfold(padded, kernel).median(dim=1).values.reshape(x.shape).to(torch.uint8)
    assert torch.equal(median_filter(x, kernel), ref)


def test_gaussian_blur_small_sigma_is_near_identity_and_sigma_1_smooths():
    x = images(2, 3, 16, 16, seed=2)
    assert (gaussian_blur(x, 3, 0.1).int() - x.int()).abs().max() <= 1
    smoothed = gaussian_blur(x, 3, 1.0)
    def roughness(t):
        return (t[..., 1:].float() - t[..., :-1].float()).abs().mean()
    assert roughness(smoothed) < 0.7 * roughness(x)


def test_upload_is_deterministic_in_seed_and_keeps_shape_and_dtype():
    x = images(3, 3, 24, 20)
    a, b, other = upload(x, seed=5), upload(x, seed=5), upload(x, seed=6)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, other)
    assert not torch.equal(a, x)


def test_defenses_reject_bad_input():
    with pytest.raises(UEDatasetsError):
        jpeg(images().float())
    with pytest.raises(UEDatasetsError):
        grayscale(images(c=4))
    with pytest.raises(UEDatasetsError):
        bit_depth(images(), 0)
    with pytest.raises(UEDatasetsError):
        median_filter(images(), 4)


def test_data_defense_registry_names_match_the_spec_names():
    assert set(DATA_DEFENSES) <= set(DEFENSE_NAMES)
    for name in DATA_DEFENSES:
        assert parse_defense(name).apply is not None


# ------------------------------------------------------------------------------------------ specs


@pytest.mark.parametrize(
    "spec, name",
    [
        ("none", "none"),
        ("jpeg", "jpeg:10"),
        ("jpeg:50", "jpeg:50"),
        (" JPEG : 50 ", "jpeg:50"),
        ("grayscale", "grayscale"),
        ("bdr", "bdr:2"),
        ("bdr:3", "bdr:3"),
        ("median", "median:3"),
        ("median:5", "median:5"),
        ("blur", "blur:0.1"),
        ("blur:1.0", "blur:1.0"),
        ("blur:1", "blur:1.0"),
        ("upload", "upload:75"),
        ("upload:50", "upload:50"),
        ("augment", "augment"),
        ("at", "at:8"),
        ("at:4", "at:4"),
        ("at:8", "at:8"),
    ],
)
def test_parse_defense_gives_canonical_names_that_parse_back(spec, name):
    d = parse_defense(spec)
    assert isinstance(d, Defense) and d.name == name and d.description
    assert parse_defense(d.name) == d


def test_parse_defense_sets_training_options():
    none, aug, at4 = parse_defense("none"), parse_defense("augment"), parse_defense("at:4")
    assert none.apply is None and not none.augment and none.adversarial_eps is None and none.pgd_steps == 0
    assert aug.apply is None and aug.augment and aug.adversarial_eps is None
    assert at4.apply is None and at4.adversarial_eps == pytest.approx(4 / 255)
    assert at4.pgd_steps == 10 and at4.pgd_step == pytest.approx(1 / 255)
    assert parse_defense("at").adversarial_eps == pytest.approx(8 / 255)


def test_parsed_parameters_reach_the_data_function():
    x = images(2, 3, 16, 16)
    assert torch.equal(parse_defense("bdr:3").apply(x, 0), bit_depth(x, 3))
    assert torch.equal(parse_defense("jpeg:50").apply(x, 0), jpeg(x, 50))
    assert torch.equal(parse_defense("upload:50").apply(x, 7), upload(x, seed=7, quality=50))
    assert torch.equal(parse_defense("blur:1.0").apply(x, 0), gaussian_blur(x, 3, 1.0))


def test_parsed_defenses_pickle():
    d = parse_defense("jpeg:20")
    assert pickle.loads(pickle.dumps(d)) == d


@pytest.mark.parametrize(
    "spec",
    ["bogus", "", "jpeg:0", "jpeg:101", "jpeg:abc", "jpeg:", "bdr:0", "bdr:9", "median:4", "median:-1",
     "blur:0", "blur:-1", "blur:nan", "upload:200", "at:0", "at:-8", "at:x", "grayscale:3", "none:1", "augment:2"],
)
def test_parse_defense_rejects_unknown_names_and_bad_parameters(spec):
    with pytest.raises(UEDatasetsError, match="valid defences"):
        parse_defense(spec)


def test_parse_defenses_splits_and_rejects_duplicates():
    assert [d.name for d in parse_defenses("none,jpeg,grayscale")] == ["none", "jpeg:10", "grayscale"]
    assert [d.name for d in parse_defenses(["at:4", "at"])] == ["at:4", "at:8"]
    with pytest.raises(UEDatasetsError, match="twice"):
        parse_defenses("jpeg,jpeg:10")
    with pytest.raises(UEDatasetsError):
        parse_defenses("none,,jpeg")
    with pytest.raises(UEDatasetsError):
        parse_defenses("")


# ------------------------------------------------------------------------------------------ augmentation


def test_random_crop_flip_is_deterministic_with_the_same_generator_and_keeps_shape():
    x = torch.rand(16, 3, 12, 10)
    a = random_crop_flip(x, torch.Generator().manual_seed(3), pad=2)
    b = random_crop_flip(x, torch.Generator().manual_seed(3), pad=2)
    c = random_crop_flip(x, torch.Generator().manual_seed(4), pad=2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_crops_and_flips_each_sample_independently():
    x = torch.rand(64, 1, 8, 8) + 1.0  # no zeros, so padding shows
    y = random_crop_flip(x, torch.Generator().manual_seed(0), pad=1)
    for xi, yi in zip(x, y):
        inner = (yi != 0).nonzero()
        r0, c0 = inner[:, 1].min(), inner[:, 2].min()
        r1, c1 = inner[:, 1].max() + 1, inner[:, 2].max() + 1
        window = yi[:, r0:r1, c0:c1]
        h, w = window.shape[1:]
        candidates = [xi[:, i : i + h, j : j + w] for i in range(9 - h) for j in range(9 - w)]
        assert any(torch.equal(window, t) or torch.equal(window, t.flip(-1)) for t in candidates)
    # with no padding only flips happen, and both outcomes occur
    z = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    flipped = [torch.equal(zi, xi.flip(-1)) for xi, zi in zip(x, z)]
    assert all(f or torch.equal(zi, xi) for f, xi, zi in zip(flipped, x, z))
    assert 0 < sum(flipped) < len(flipped)


def test_augment_pad_is_4_for_cifar_and_an_eighth_of_the_side_otherwise():
    assert augment_pad(32, 32) == 4
    assert augment_pad(28, 28) == 3
    assert augment_pad(64, 48) == 6
