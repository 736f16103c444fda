"""The fused CPU kernel of CUDA's filter (`kernels.fused_filter`) gives the torch passes' bytes, bit for bit."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from ue_datasets.fit.convolution import draw_filters
from ue_datasets.kernels import convolution as conv
from ue_datasets.kernels import fused_filter as ff

SIZES = [(1, 1), (2, 3), (5, 4), (17, 31), (64, 64)]


def _images(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """7 images: 3 random, all black, all 255, one bright pixel on black, one dark pixel on 255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (7, c, h, w), dtype=torch.uint8, generator=g)
    x[3] = 0
    x[4] = 255
    x[5] = 0
    x[5, :, h // 2, w // 2] = 255
    x[6] = 255
    x[6, :, 0, w - 1] = 3
    return x


def _filters(k: int, n: int = 7, seed: int = 0) -> torch.Tensor:
    """Real CUDA filters (``draw_filters``, as the protection stores them) and random float32 ones."""
    g = torch.Generator().manual_seed(seed)
    real = torch.from_numpy(draw_filters(n, key=seed, kernel_size=k, blur=0.3)).float()
    rand = torch.rand(n, k, k, generator=g)
    return torch.where(torch.arange(n)[:, None, None] % 2 == 0, real, rand)


def _both(x, f, gray, quantize):
    """The torch passes on ``x`` and the fused kernel on ``x`` and on its channels-last copy (read and
    written interleaved); the two fused outputs must be the same bytes."""
    assert conv._use_fused(x, f, gray)
    got = conv.filter_images(x, f, gray, quantize)
    interleaved = conv.filter_images(x.contiguous(memory_format=torch.channels_last), f, gray, quantize)
    assert torch.equal(interleaved, got)
    return conv._filter_passes(x, f, gray, quantize), got


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("quantize", ["truncate", "round"])
@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("c", [1, 3])
def test_fused_filter_equals_torch_passes_bit_for_bit_in_either_layout(c, k, gray, quantize, size):
    x, f = _images(c, *size, seed=k), _filters(k, seed=c)
    ref, got = _both(x, f, gray, quantize)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, ref)
    assert not got[3].any()  # all black stays black


@pytest.mark.parametrize("kind", ["negative", "wide-range", "subnormal", "nan-inf-huge"])
def test_fused_filter_equals_torch_passes_for_weights_that_leave_0_255(kind):
    """Negative sums (the uint8 cast wraps as torch's int32 truncation does), max at the tiny clamp,
    subnormal products, NaN and infinite weights (amax's NaN, 0 * inf taps skipped on the padding)."""
    g = torch.Generator().manual_seed(5)
    for c, k, gray, quantize in itertools.product((1, 3), (1, 3, 5), (False, True), ("truncate", "round")):
        x = _images(c, 9, 13, seed=k)
        f = torch.randn(7, k, k, generator=g)
        if kind == "wide-range":
            f = f * 2.0 ** torch.randint(-60, 60, f.shape, generator=g)
        elif kind == "subnormal":
            f = f.abs() * 1e-42
        elif kind == "nan-inf-huge":
            m = torch.rand(f.shape, generator=g)
            f[m < 0.1] = float("nan")
            f[(m >= 0.1) & (m < 0.2)] = float("inf")
            f[(m >= 0.2) & (m < 0.3)] = -float("inf")
            f[(m >= 0.3) & (m < 0.4)] = 3e38
        ref, got = _both(x, f, gray, quantize)
        assert torch.equal(got, ref), (c, k, gray, quantize)


def test_only_finite_nonnegative_weights_with_a_bounded_sum_skip_the_casts_range_check():
    """CUDA's filters take the plain path (no NaN, no cast out of 0..255); weights at and past its bounds
    take the checked one, and both give the torch passes' bytes (past the bound, 255 * w overflows)."""
    assert all(ff._plain(f.numpy()) for f in _filters(3, n=8)[::2])
    cases = {"large": (1e29, True), "sum past the bound": (2e30, False), "overflowing products": (1e37, False),
             "one negative": (-1e-3, False), "nan": (float("nan"), False)}
    x = _images(3, 9, 13)
    for name, (value, plain) in cases.items():
        f = torch.full((7, 3, 3), 1e28)
        f[:, 1, 1] = value
        assert ff._plain(f[0].numpy()) is plain, name
        for gray, quantize in itertools.product((False, True), ("truncate", "round")):
            ref, got = _both(x, f, gray, quantize)
            assert torch.equal(got, ref), (name, gray, quantize)


def test_torch_cpu_channel_mean_is_the_float32_sum_in_channel_order_divided_by_three():
    """What the kernel reproduces: ``z.mean(dim=1)`` over 3 float32 channels is ``((z0 + z1) + z2) / 3``,
    rounded at each step in float32; the other orders, ``* (1/3)`` and float64 all differ somewhere."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    others = {"z0+(z1+z2)": 0, "(z0+z2)+z1": 0, "*(1/3)": 0, "float64": 0}
    for shape in [(64, 3, 1, 1), (7, 3, 2, 3), (5, 3, 5, 4), (3, 3, 17, 31), (2, 3, 64, 64), (1, 3, 224, 224)]:
        z = rng.random(shape, dtype=np.float32) * (f32(2) ** rng.integers(-12, 12, shape)).astype(f32)
        mean = torch.from_numpy(z).mean(dim=1, keepdim=True).numpy()
        a, b, c = z[:, 0:1], z[:, 1:2], z[:, 2:3]
        np.testing.assert_array_equal(mean.view(np.uint32), (((a + b) + c) / f32(3)).view(np.uint32))
        for name, v in {"z0+(z1+z2)": (a + (b + c)) / f32(3), "(z0+z2)+z1": ((a + c) + b) / f32(3),
                        "*(1/3)": ((a + b) + c) * (f32(1) / f32(3)),
                        "float64": ((a.astype(np.float64) + b + c) / 3).astype(f32)}.items():
            others[name] += int((v.view(np.uint32) != mean.view(np.uint32)).sum())
    assert all(n > 0 for n in others.values()), others


def test_an_image_gets_the_same_bytes_alone_or_in_a_batch_of_37():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (37, 3, 12, 10), dtype=torch.uint8, generator=g)
    f = _filters(3, n=37)
    for gray in (False, True):
        whole = conv.filter_images(x, f, gray)
        assert torch.equal(whole, conv._filter_passes(x, f, gray, "truncate"))
        for i in (0, 17, 36):
            assert torch.equal(conv.filter_images(x[i : i + 1], f[i : i + 1], gray)[0], whole[i])


def test_non_contiguous_inputs_give_the_same_bytes_and_keep_their_layout():
    x = _images(3, 17, 31)
    f = _filters(3)
    ref = conv._filter_passes(x, f, False, "truncate")
    channels_last = x.contiguous(memory_format=torch.channels_last)
    out = conv.filter_images(channels_last, f)
    assert torch.equal(out, ref)
    assert out.stride() == channels_last.stride() == conv._filter_passes(channels_last, f, False, "truncate").stride()
    hwc_views = torch.stack([im.permute(1, 2, 0) for im in x]).permute(0, 3, 1, 2)  # as decoded images lie
    assert torch.equal(conv.filter_images(hwc_views, f), ref)
    rgba_colour = torch.cat([x, x[:, :1]], 1).contiguous(memory_format=torch.channels_last)[:, :3]
    assert not rgba_colour.is_contiguous(memory_format=torch.channels_last)  # stride 4: made contiguous
    assert torch.equal(conv.filter_images(rgba_colour, f), ref)
    wide = _images(3, 17, 40)
    sliced = wide[:, :, :, 3:34]
    assert not sliced.is_contiguous()
    assert torch.equal(conv.filter_images(sliced, f), conv._filter_passes(sliced, f, False, "truncate"))
    transposed = f.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, other strides
    assert not transposed.is_contiguous()
    assert torch.equal(conv.filter_images(x, transposed), ref)
    every_other = torch.stack([f, 2 * f], dim=1)[:, 0]  # image stride 18, not 9
    assert not every_other.is_contiguous()
    assert torch.equal(conv.filter_images(x, every_other), ref)


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_thread_pool_sizes_1_and_2_give_the_same_bytes(gray):
    x = _images(3, 33, 29).repeat(3, 1, 1, 1)
    f = _filters(3, n=21)
    one = ff.filter_images(x, f, gray, False, threads=1)
    assert torch.equal(one, conv._filter_passes(x, f, gray, "truncate"))
    for threads in (2, 3, 64):
        assert torch.equal(ff.filter_images(x, f, gray, False, threads=threads), one)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the default is torch's thread count
        assert torch.equal(conv.filter_images(x, f, gray), one)
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_from_4_python_threads_are_correct():
    cases = []
    for seed in range(4):
        x = _images(3, 24, 20, seed=seed).repeat(2, 1, 1, 1)
        f = _filters(3 + 2 * (seed % 2), n=14, seed=seed)
        cases.append((x, f, seed % 2 == 1, conv._filter_passes(x, f, seed % 2 == 1, "round")))
    failures = []
    start = threading.Barrier(4)

    def work(x, f, gray, ref):
        start.wait()
        for _ in range(10):
            if not torch.equal(ff.filter_images(x, f, gray, True, threads=2), ref):
                failures.append(gray)

    workers = [threading.Thread(target=work, args=case) for case in cases]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures


def test_a_forked_child_makes_its_own_pool(monkeypatch):
    pool = ff._pool(2)
    assert ff._pool(2) is pool
    monkeypatch.setattr(ff.os, "getpid", lambda: -1)  # as in a child after fork: the threads are gone
    child = ff._pool(2)
    assert child is not pool
    x, f = _images(1, 5, 6), _filters(3)
    assert torch.equal(ff.filter_images(x, f, False, False, threads=2), conv._filter_passes(x, f, False, "truncate"))


def _no_kernel(*args):
    raise AssertionError("the fused kernel ran")


def test_fused_0_keeps_the_torch_passes_with_the_same_bytes(monkeypatch):
    x, f = _images(3, 17, 31), _filters(5)
    fused = conv.filter_images(x, f, True, "round")
    monkeypatch.setenv(conv.FUSED_ENV, "0")
    monkeypatch.setattr(ff, "_fused_filter", _no_kernel)
    assert not conv._use_fused(x, f, True)
    assert torch.equal(conv.filter_images(x, f, True, "round"), fused)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    out = conv.filter_images(channels_last, f, True, "round")
    assert torch.equal(out, fused) and out.stride() == channels_last.stride()


@pytest.mark.parametrize("grayscale", [False, True], ids=["rgb", "gray"])
def test_decoded_images_are_protected_as_they_lie_with_the_bytes_of_a_contiguous_batch(grayscale, monkeypatch):
    """`protect_batch` stacks decoded images (``(C, H, W)`` views of ``(H, W, C)`` arrays) channels-last for
    CUDA, and the kernel writes its output so: the encoder gets ``(H, W, C)`` memory without a copy."""
    from ue_datasets import fit_convolution, protect_batch
    from ue_datasets.apply.images import pil_to_tensor, tensor_to_pil

    protection = fit_convolution(4, key=3, grayscale=grayscale)
    x = _images(3, 19, 23)
    decoded = [pil_to_tensor(tensor_to_pil(im)) for im in x]
    assert not decoded[0].is_contiguous() and decoded[0].permute(1, 2, 0).is_contiguous()
    labels = torch.arange(7) % 4
    expected = protect_batch(protection, x, labels)
    out = protect_batch(protection, decoded, labels)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))
    assert all(o.permute(1, 2, 0).is_contiguous() for o in out)
    monkeypatch.setenv(conv.FUSED_ENV, "0")  # the torch passes: the same bytes and layout
    again = protect_batch(protection, decoded, labels)
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(again, out))


def test_without_numba_the_torch_passes_run_and_one_warning_says_so(monkeypatch, caplog):
    from ue_datasets import kernels

    x, f = _images(3, 9, 8), _filters(3)
    fused = conv.filter_images(x, f)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "ue_datasets.kernels.fused_filter")
    monkeypatch.delattr(kernels, "fused_filter")
    monkeypatch.setattr(conv, "_fused_module", None)
    with caplog.at_level(logging.WARNING, logger=conv.__name__):
        for _ in range(3):
            assert torch.equal(conv.filter_images(x, f), fused)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "numba" in caplog.records[0].getMessage()


def test_inputs_outside_the_kernel_take_the_torch_passes(monkeypatch):
    monkeypatch.setattr(ff, "_fused_filter", _no_kernel)
    x = _images(3, 6, 7)
    g = torch.Generator().manual_seed(0)
    even = torch.rand(7, 4, 4, generator=g)
    two = _images(2, 6, 7)
    meta = torch.empty(7, 3, 6, 7, dtype=torch.uint8, device="meta")
    for xs, fs, gray in [(x, even, False), (x, _filters(3).double(), False), (two, _filters(3), True),
                         (meta, _filters(3).to("meta"), False)]:
        assert not conv._use_fused(xs, fs, gray)
    out = conv.filter_images(x, even)
    assert out.shape == x.shape and out.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_keeps_the_torch_passes_and_matches_the_cpu_kernel(monkeypatch):
    x, f = _images(3, 17, 31), _filters(3)
    cpu = conv.filter_images(x, f)
    monkeypatch.setattr(ff, "_fused_filter", _no_kernel)
    assert not conv._use_fused(x.cuda(), f.cuda(), False)
    assert conv.filter_images(x.cuda(), f.cuda()).shape == cpu.shape


@pytest.mark.slow
def test_kernel_compiles_and_runs_where_numba_finds_no_cache_directory(tmp_path):
    """``cache=True`` with no writable cache location (numba raises at decoration): compiled in memory."""
    code = ("import torch; from ue_datasets.kernels import convolution as c, fused_filter as f; "
            "x = torch.randint(0, 256, (3, 3, 9, 8), dtype=torch.uint8); w = torch.rand(3, 3, 3); "
            "assert c._use_fused(x, w, False); "
            "assert torch.equal(c.filter_images(x, w), c._filter_passes(x, w, False, 'truncate')); "
            "print(type(f._fused_filter._cache).__name__)")
    env = {**__import__("os").environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "NullCache"
    assert "Warning" not in run.stderr
