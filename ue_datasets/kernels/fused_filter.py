"""CUDA's filter on CPU in one pass per image: the numba kernel behind `convolution.filter_images`.

`convolution.filter_images` computes its output as whole-batch torch passes (k*k multiply and add
passes, the channel mean, the max, the division, ``* 255``, ``+ 0.5``, the cast), each streaming the
chunk through memory. This kernel does the same float32 operations, in the same order, for every
output pixel, one image at a time, so an image and its float32 buffer stay in cache:

- correlation, per output pixel and channel: ``acc = 0``; for each tap ``(i, j)`` in row-major order
  whose source pixel is inside the image, ``acc = acc + float32(x[y + i - p, x + j - p]) * w[i, j]``: a
  rounded product, then a rounded sum (no fused multiply-add, no reassociation: numba compiles without
  fastmath). Row by row: the k source rows wait converted to float32 in a ring of k rows, the taps add
  into a row buffer (tap outer, x inner, so LLVM vectorises over x); with k = 3 (CUDA's default) the
  rows with all 3 source rows inside the image keep the nine-term sum in a register instead. A
  channels-last batch (as decoded images lie) is read and written as it lies, without a transposing
  copy: a row of interleaved channels is one row of W * C values whose horizontal taps are C apart;
- grayscale (C = 3): ``((z0 + z1) + z2) / 3``, which is how torch's CPU ``mean(dim=1)`` does it: its sum
  kernel adds the 3 channels in order into a float32 accumulator, then ``mean`` divides the sum by the
  count (a true division, not a product with ``1/3``). With C = 1 the mean is the value itself;
- ``peak = max(z)`` over C, H, W (NaN if any value is NaN, as ``amax``), raised to float32's smallest
  normal number (``clamp_min``);
- ``z / peak`` (an IEEE division), ``* 255``, ``+ 0.5`` with ``round_half_up``: each rounded to float32;
- the cast to uint8 as torch does it on x86: truncation to int32 (NaN and out-of-range values give
  ``INT32_MIN``), then the low byte. Only negative, infinite or NaN weights, and finite ones so large that
  products or sums overflow, ever leave ``[0, 255.5]``: for finite nonnegative weights with a bounded sum
  (`_plain`; CUDA's filters are such) the kernel skips the range check, which costs about a tenth of its
  time otherwise.

Hence the bytes are those of the torch passes, bit for bit, for every input. The kernel releases the
GIL: `filter_images` here splits a batch into blocks of whole images, a few per thread, which the
calling thread and a shared pool take in turn, on ``torch.get_num_threads()`` threads in all (one, and
no pool, after ``torch.set_num_threads(1)``). Calls from several Python threads at once are safe.
This module imports numba (an ImportError without it): `convolution.filter_images` imports it on its
first CPU call, not when the package is imported, and asks `available()` whether the kernel compiled.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

_log = logging.getLogger(__name__)

#: The one signature compiled: x uint8 (B, C, H, W) or (B, 1, H, W * C), filters float32 (B, k, k), out
#: uint8 as x, all C-contiguous; grayscale; round_half_up; C.
_SIGNATURE = "void(u1[:, :, :, ::1], f4[:, :, ::1], u1[:, :, :, ::1], b1, b1, i8)"

_f32 = np.float32
_U = np.uintp  # unsigned indices: numba adds no negative-index wraparound, so LLVM vectorises the loops
_ZERO, _THREE, _SCALE, _HALF, _NEG_INF = _f32(0.0), _f32(3.0), _f32(255.0), _f32(0.5), _f32(-np.inf)
_TINY = _f32(np.finfo(np.float32).tiny)  # torch.finfo(torch.float32).tiny, the clamp on the max
_INT_LO, _INT_HI = _f32(-2147483648.0), _f32(2147483648.0)  # float32 values in [_INT_LO, _INT_HI) fit int32


def _jit(fn):
    """``njit(nogil=True, cache=True)``; without the on-disk cache where numba finds no writable directory
    (neither ``__pycache__`` beside this file nor its user cache directory)."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


#: Nonnegative weights that sum to at most this filter an image to values in [0, about 255e30]: finite,
#: so never NaN, and the quotients by their max are in [0, 1] (`_fused_filter` then skips the cast's
#: range check).
_PLAIN_SUM = _f32(1e30)


@_jit
def _plain(wts):  # pragma: no cover (compiled)
    """Whether the weights are finite, nonnegative and sum to at most `_PLAIN_SUM` (CUDA's filters do)."""
    total = _ZERO
    for i in range(wts.shape[0]):
        for j in range(wts.shape[1]):
            v = wts[i, j]
            if not (v >= _ZERO and v <= _PLAIN_SUM):  # NaN fails too
                return False
            total = total + v
    return total <= _PLAIN_SUM


@_jit
def _taps(dst, ring, y, wts, h, s):  # pragma: no cover (compiled)
    """One output row of one channel, tap by tap: ``dst[x] = 0 + t(0, 0) + t(0, 1) + ...`` over the taps
    whose source pixel is inside the image. ``ring[sy % k]`` holds source row ``sy`` as float32, one
    value every ``s`` elements for each channel (``s`` = 1 planar, C interleaved)."""
    w = dst.shape[0]
    k = wts.shape[0]
    p = k // 2
    for t in range(w):
        dst[t] = _ZERO
    for i in range(k):
        sy = y + i - p
        if sy < 0 or sy >= h:
            continue
        src = ring[sy % k]
        for j in range(k):
            dx = (j - p) * s
            x0, x1 = max(0, -dx), min(w, w - dx)
            if x0 >= x1:
                continue
            wt = wts[i, j]
            d0, s0 = _U(x0), _U(x0 + dx)
            for t in range(_U(x1 - x0)):
                dst[d0 + t] = dst[d0 + t] + src[s0 + t] * wt


@_jit
def _taps3(dst, r0, r1, r2, wts, s):  # pragma: no cover (compiled)
    """`_taps` for k = 3 on a row whose 3 source rows ``r0, r1, r2`` are all inside the image: the same
    nine products and sums per pixel, kept in a register rather than added to ``dst`` tap by tap."""
    w = dst.shape[0]
    w00, w01, w02 = wts[0, 0], wts[0, 1], wts[0, 2]
    w10, w11, w12 = wts[1, 0], wts[1, 1], wts[1, 2]
    w20, w21, w22 = wts[2, 0], wts[2, 1], wts[2, 2]
    u = _U(s)
    for t in range(u, _U(w) - u):
        a = _ZERO + r0[t - u] * w00
        a = a + r0[t] * w01
        a = a + r0[t + u] * w02
        a = a + r1[t - u] * w10
        a = a + r1[t] * w11
        a = a + r1[t + u] * w12
        a = a + r2[t - u] * w20
        a = a + r2[t] * w21
        a = a + r2[t + u] * w22
        dst[t] = a
    for e in range(2 * s):  # the first and last column skip the taps on the padding
        t = e if e < s else w - 2 * s + e
        a = _ZERO
        for i, src in enumerate((r0, r1, r2)):
            for j in range(3):
                q = t + (j - 1) * s
                if 0 <= q < w:
                    a = a + src[q] * wts[i, j]
        dst[t] = a


@_jit
def _fused_filter(x, filters, out, grayscale, round_half_up, channels):  # pragma: no cover (compiled)
    """Filter images ``x[b]`` with ``filters[b]`` into ``out[b]`` (see the module docstring).

    Args:
        x: uint8 ``(B, C, H, W)`` (planar), or ``(B, 1, H, W * C)`` (channels interleaved, as
            channels-last memory holds them), C-contiguous.
        filters: float32 ``(B, k, k)``, C-contiguous, k odd.
        out: uint8, the shape and layout of ``x``, C-contiguous, written.
        grayscale: channel mean first (C = 3; with C = 1 the mean changes nothing).
        round_half_up: add 0.5 before the cast.
        channels: C.
    """
    n, planes, h, length = x.shape
    s = channels // planes  # a channel's next value along a row is s elements on: 1 planar, C interleaved
    w = length // s
    k = filters.shape[1]
    p = k // 2
    gray = grayscale and channels == 3
    zplanes, zlen = (1, w) if gray else (planes, length)
    z = np.empty((zplanes, h, zlen), np.float32)  # the filtered image (its channel mean with gray)
    ring = np.empty((planes, k, length), np.float32)  # per plane, source rows y - p .. y + p as float32
    acc = np.empty((planes, length), np.float32)  # with gray, the filtered row of each plane
    flat = acc.reshape(-1)
    cs = w if s == 1 else 1  # with gray, the next channel of a pixel is cs elements on in `flat`
    mean = np.empty(w, np.uint8)  # with gray and interleaved channels, an output row before it is spread
    # Running max per column, read from one row and written to the other (elementwise, so it
    # vectorises; writing back to the row just read would compile to slow masked stores on AMD CPUs).
    col_max = np.empty((2, zlen), np.float32)
    for b in range(n):
        wts = filters[b]
        plain = _plain(wts)
        for t in range(zlen):
            col_max[0, t] = _NEG_INF
        last = 0
        for y in range(h):
            for ch in range(planes):
                for sy in range(0 if y == 0 else y + p, min(h, y + p + 1)):
                    src, dst = x[b, ch, sy], ring[ch, sy % k]
                    for t in range(length):
                        dst[t] = _f32(src[t])
                row = acc[ch] if gray else z[ch, y]
                if k == 3 and w >= 3 and 0 < y < h - 1:
                    _taps3(row, ring[ch, (y - 1) % 3], ring[ch, y % 3], ring[ch, (y + 1) % 3], wts, s)
                else:
                    _taps(row, ring[ch], y, wts, h, s)
            if gray:
                zr = z[0, y]
                for t in range(w):
                    q = t * s
                    zr[t] = ((flat[q] + flat[q + cs]) + flat[q + 2 * cs]) / _THREE
            for ch in range(zplanes):
                zr, seen, dst = z[ch, y], col_max[last], col_max[1 - last]
                last = 1 - last
                for t in range(zlen):
                    v, m = zr[t], seen[t]
                    # NaN wins, as in amax: once in, no comparison replaces it.
                    dst[t] = v if (v > m or math.isnan(v)) else m
        peak = col_max[last, 0]
        for t in range(1, zlen):
            v = col_max[last, t]
            peak = v if (v > peak or math.isnan(v)) else peak
        if not (peak >= _TINY or math.isnan(peak)):  # clamp_min(tiny), which keeps a NaN
            peak = _TINY
        half = _HALF if round_half_up else _ZERO  # v + 0 == v for every v here but -0 (no byte differs)
        for ch in range(zplanes):
            for y in range(h):
                zr = z[ch, y]
                orow = mean if gray and s > 1 else out[b, ch, y]
                if plain:  # 0 <= z <= peak: the quotient is in [0, 1], v in [0, 255.5]
                    for t in range(zlen):
                        orow[t] = np.uint8(np.int32(zr[t] / peak * _SCALE + half))
                else:
                    for t in range(zlen):
                        v = zr[t] / peak * _SCALE + half
                        # float32 -> uint8 as torch casts on x86: int32 truncation (NaN and values out
                        # of int32's range give INT32_MIN, whose low byte is 0), then the low byte.
                        v = v if (v >= _INT_LO and v < _INT_HI) else _INT_LO
                        orow[t] = np.uint8(np.int32(v) & 255)
                if gray and s > 1:  # every channel of a pixel is its mean's
                    dst = out[b, 0, y]
                    for t in range(w):
                        dst[3 * t] = dst[3 * t + 1] = dst[3 * t + 2] = orow[t]
                elif gray:
                    for other in range(1, channels):
                        dst = out[b, other, y]
                        for t in range(w):
                            dst[t] = orow[t]


_lock = threading.Lock()
_ready = False  # the kernel is compiled (or loaded from the cache)
_failed = False  # the compilation failed: never try again in this process
_pools: dict[int, tuple[int, ThreadPoolExecutor]] = {}  # threads -> (pid that made it, pool)
_BLOCKS_PER_THREAD = 4


def available() -> bool:
    """Whether the kernel runs here: compiles it once per process, or loads it from numba's on-disk cache.

    If the compilation fails, logs one warning and returns False from then on.
    """
    global _ready, _failed
    if _ready:
        return True
    with _lock:
        if not _ready and not _failed:
            try:
                _fused_filter.compile(_SIGNATURE)
                _fused_filter.disable_compile()  # any other argument type is a bug, not a new compilation
                _ready = True
            except Exception as e:  # noqa: BLE001 - any numba error: the torch passes do the work
                _failed = True
                _log.warning("ue_datasets: the fused CPU filter does not compile (%s: %s); using the torch "
                             "passes", type(e).__name__, e)
    return _ready


def _pool(threads: int) -> ThreadPoolExecutor:
    """A shared pool of ``threads - 1`` workers (the calling thread takes blocks too).

    Made again in a forked child, whose copy of the parent's pool has no threads.
    """
    with _lock:
        pid, pool = _pools.get(threads, (None, None))
        if pool is None or pid != os.getpid():
            pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="ue-fused-filter")
            _pools[threads] = (os.getpid(), pool)
        return pool


def filter_images(x: torch.Tensor, filters: torch.Tensor, grayscale: bool, round_half_up: bool,
                  threads: int | None = None) -> torch.Tensor:
    """`convolution.filter_images` on CPU, the same bytes (call `available()` first).

    Args:
        x: uint8 ``(B, C, H, W)`` on CPU, any strides; C = 1 or 3 when ``grayscale`` (any C otherwise).
        filters: float32 ``(B, k, k)`` on CPU, k odd, any strides.
        grayscale: set every channel to the channel mean before the division.
        round_half_up: add 0.5 before the cast (``quantize="round"``); truncate otherwise.
        threads: blocks of images run at once; default ``torch.get_num_threads()``.

    Returns:
        uint8 ``(B, C, H, W)``, channels-last where ``x`` is channels-last contiguous (read and written
        as it lies, as decoded images and image encoders hold pixels: no transposing copy either way),
        contiguous otherwise; each image's bytes depend on it and its filter alone.
    """
    n, c, h, w = x.shape
    if c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        xa = x.detach().permute(0, 2, 3, 1).numpy().reshape(n, 1, h, w * c)
        oa = out.permute(0, 2, 3, 1).numpy().reshape(n, 1, h, w * c)
    else:
        out = torch.empty(x.shape, dtype=torch.uint8)
        xa, oa = x.detach().contiguous().numpy(), out.numpy()
    fa = filters.detach().contiguous().numpy()
    if out.numel() == 0:
        return out
    threads = max(1, min(n, torch.get_num_threads() if threads is None else threads))
    if threads == 1:
        _fused_filter(xa, fa, oa, grayscale, round_half_up, c)
        return out
    # Blocks of whole images, a few per thread, taken in turn by the pool's threads and this one, so a
    # thread slowed down by the rest of the machine takes fewer.
    step = -(-n // (_BLOCKS_PER_THREAD * threads))
    starts = iter(range(0, n, step))
    take = threading.Lock()

    def drain() -> None:
        while True:
            with take:
                s = next(starts, None)
            if s is None:
                return
            _fused_filter(xa[s : s + step], fa[s : s + step], oa[s : s + step], grayscale, round_half_up, c)

    pool = _pool(threads)
    futures = [pool.submit(drain) for _ in range(threads - 1)]
    drain()
    for f in futures:
        f.result()
    return out
