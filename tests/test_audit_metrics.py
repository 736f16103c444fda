"""Imperceptibility metrics: exact values on known perturbations, SSIM behaviour, summary and grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ue_datasets.audit.metrics import (
    difference_grid,
    imperceptibility,
    l2,
    linf,
    psnr,
    ssim,
    ssim_window,
)
from ue_datasets.errors import UEDatasetsError


def images(n: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0, low: int = 0, high: int = 256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_psnr_of_a_constant_plus_4_is_20_log10_255_over_4():
    a = images(3, 3, 8, 8, high=250)
    p = psnr(a, a + 4)
    assert p.dtype == torch.float64 and p.shape == (3,)
    assert torch.allclose(p, torch.full((3,), 20 * math.log10(255 / 4), dtype=torch.float64), rtol=0, atol=1e-9)


def test_psnr_is_inf_for_identical_images():
    a = images(2)
    assert torch.isinf(psnr(a, a)).all() and (psnr(a, a) > 0).all()


def test_linf_and_l2_on_known_differences():
    a = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 108  # one pixel +8
    b[1] += 3  # every pixel +3
    b[1, 0, 2, 2] = 90  # one pixel -10
    assert linf(a, b).tolist() == [8.0, 10.0]
    expected = torch.tensor([8 / 255, math.sqrt(15 * 9 + 100) / 255], dtype=torch.float64)
    assert torch.allclose(l2(a, b), expected, rtol=0, atol=1e-12)
    assert linf(a, b).dtype == torch.float64 and l2(a, b).dtype == torch.float64


def test_linf_does_not_wrap_around_uint8():
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    b = torch.full_like(a, 255)
    assert linf(a, b).item() == 255.0 and linf(b, a).item() == 255.0


@pytest.mark.parametrize("c", [1, 3])
def test_ssim_of_identical_images_is_exactly_1(c):
    a = images(3, c, 20, 17)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ssim_decreases_with_noise():
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(40, 215, 24)
    a = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).expand(2, 3, 24, 24).round().to(torch.uint8)
    values = []
    for sigma in (2.0, 8.0, 32.0):
        noise = torch.randn(a.shape, generator=g) * sigma
        values.append(ssim(a, (a.float() + noise).round().clamp(0, 255).to(torch.uint8)))
    assert (values[0] < 1).all() and (values[0] > values[1]).all() and (values[1] > values[2]).all()


def test_ssim_matches_a_direct_single_window_computation():
    # an 11x11 image has exactly one valid window: SSIM is the formula on Gaussian-weighted moments
    a, b = images(1, 1, 11, 11, seed=4), images(1, 1, 11, 11, seed=5)
    i = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(i**2) / (2 * 1.5**2))
    wgt = torch.outer(g, g) / torch.outer(g, g).sum()
    x, y = a[0, 0].double() / 255, b[0, 0].double() / 255
    mx, my = (wgt * x).sum(), (wgt * y).sum()
    sxx, syy, sxy = (wgt * x * x).sum() - mx**2, (wgt * y * y).sum() - my**2, (wgt * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    assert ssim(a, b).item() == pytest.approx(ref.item(), abs=1e-12)


def test_ssim_window_shrinks_to_an_odd_size_for_small_images():
    assert ssim_window(32, 32) == 11
    assert ssim_window(8, 8) == 7
    assert ssim_window(10, 20) == 9
    a, b = images(2, 3, 8, 6), images(2, 3, 8, 6, seed=1)
    s = ssim(a, b)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s < 1).all()


def test_metrics_reject_mismatched_or_non_uint8_inputs():
    with pytest.raises(UEDatasetsError):
        psnr(images(2), images(3))
    with pytest.raises(UEDatasetsError):
        ssim(images(2).float(), images(2).float())


def test_imperceptibility_summary_keys_and_worst_case_semantics():
    a = images(3, 3, 16, 16, high=240)
    b = a.clone()
    b[1] += 2  # small everywhere
    b[2, :, 0, 0] += 12  # large at one pixel
    summary = imperceptibility(a, b)
    assert set(summary) == {"linf", "l2", "psnr", "ssim", "n", "identical"}
    assert summary["n"] == 3 and summary["identical"] == 1
    for key in ("linf", "l2", "psnr", "ssim"):
        assert set(summary[key]) == {"mean", "worst"}
        assert all(type(v) is float for v in summary[key].values())
    li, l2_, ps, ss = linf(a, b), l2(a, b), psnr(a, b), ssim(a, b)
    assert summary["linf"]["worst"] == 12.0 == li.max().item()
    assert summary["l2"]["worst"] == l2_.max().item()
    assert summary["psnr"]["worst"] == ps.min().item() and math.isfinite(summary["psnr"]["worst"])
    assert summary["ssim"]["worst"] == ss.min().item() < 1
    assert summary["linf"]["mean"] == pytest.approx(14 / 3)
    # the identical pair (PSNR inf) is left out of the PSNR mean
    assert summary["psnr"]["mean"] == pytest.approx(ps[1:].mean().item())


def test_imperceptibility_of_identical_sets_keeps_inf_and_encodes_for_json():
    a = images(2)
    summary = imperceptibility(a, a)
    assert summary["psnr"] == {"mean": math.inf, "worst": math.inf}
    assert summary["linf"] == {"mean": 0.0, "worst": 0.0} and summary["ssim"]["worst"] == 1.0
    json.dumps(summary)  # Python writes Infinity; report writers encode inf as "inf"


def test_difference_grid_is_an_rgb_image_with_three_rows_of_upscaled_tiles():
    a = images(10, 3, 16, 16)
    b = (a.int() + 3).clamp(0, 255).to(torch.uint8)
    grid = difference_grid(a, b, n=8)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    w, h = grid.size
    assert 3 * 96 <= h < 3 * 96 + 60  # 16 px tiles upscaled x6 to 96 px
    assert 8 * 96 <= w < 8 * 96 + 300  # 8 columns plus a label margin
    one = difference_grid(a[:1, :1], b[:1, :1], n=8)  # grayscale, one column
    assert one.mode == "RGB" and one.size[0] < w and one.size[1] == h


def test_difference_grid_amplifies_the_largest_difference_to_white():
    a = torch.full((1, 3, 96, 96), 100, dtype=torch.uint8)
    b = a.clone()
    b[0, :, 10:20, 10:20] = 104
    arr = torch.from_numpy(np.array(difference_grid(a, b)))
    assert arr.max() == 255
    # the difference row holds pure black (no change) and pure white (the largest change)
    bottom = arr[-100:-4]
    assert (bottom == 0).any() and (bottom == 255).any()
