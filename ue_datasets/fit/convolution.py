"""Fit CUDA (Convolution-based Unlearnable DAtaset; Sadasivan et al., CVPR 2023): class-wise filters from a key.

In code the method is called ``convolution`` so that it never reads as the NVIDIA device; the command
line keeps the paper's name (``ue-datasets fit cuda``).

Faithful to the official code (``final_filter_unlearnable.py``): numpy's legacy global RNG seeded with
the key draws, for each class in order, a float64 ``(3, 1, k, k)`` block ``U(0, blur)``, then a row and
a column with ``randint(k)`` that set one entry to ``center`` (1.0). Only the first channel's filter is
kept: the official code copies it onto the other two channels. Seed 0, k=3, blur=0.3 gives the test
vectors of the paper's code. ``universal=True`` uses class 0's filter for every class (``same=True``).
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch

from ..artifact import Protection
from ..errors import UEDatasetsError

METHOD = "convolution"
QUANTIZE_MODES = ("truncate", "round")


def check_key(key: int) -> int:
    """``key`` as an int, refused unless it is an integer in ``[0, 2**32)`` (numpy's legacy seed range)."""
    if isinstance(key, bool) or not isinstance(key, numbers.Integral) or not 0 <= key < 2**32:
        raise UEDatasetsError(f"key must be an integer in [0, 2**32), got {key!r}")
    return int(key)


def check_filter_options(kernel_size: int, blur: float) -> None:
    """Refuse filter options `draw_filters` cannot take: an even or non-positive size, ``blur <= 0``."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise UEDatasetsError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if not blur > 0:
        raise UEDatasetsError(f"blur (p_b) must be > 0, got {blur}")


def draw_filters(num_classes: int, key: int, kernel_size: int = 3, blur: float = 0.3, center: float = 1.0) -> np.ndarray:
    """Draw the class filters exactly as the official code does.

    Returns:
        float64 array ``(num_classes, kernel_size, kernel_size)``; entries in ``[0, blur)`` but one
        entry per filter equal to ``center``.
    """
    rng = np.random.RandomState(key)
    filters = np.empty((num_classes, kernel_size, kernel_size), dtype=np.float64)
    for c in range(num_classes):
        w = rng.uniform(low=0, high=blur, size=(3, 1, kernel_size, kernel_size))
        w[0, 0, rng.randint(kernel_size), rng.randint(kernel_size)] = center
        filters[c] = w[0, 0]
    return filters


def fraction_salt(key: int) -> torch.Tensor:
    """32 secret bytes derived from the key that decide which samples a partial protection covers."""
    digest = hashlib.sha256(f"ue-datasets/{METHOD}/fraction/{key}".encode()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()


def fit_convolution(
    num_classes: int,
    key: int,
    kernel_size: int = 3,
    blur: float = 0.3,
    universal: bool = False,
    grayscale: bool = False,
    fraction: float = 1.0,
    quantize: str = "truncate",
) -> Protection:
    """Fit a CUDA protection: one ``kernel_size x kernel_size`` filter per class, derived from ``key``.

    Args:
        num_classes: number of labels; labels must lie in ``[0, num_classes)``.
        key: the private key, an integer seed in ``[0, 2**32)`` (numpy's legacy seed range).
        kernel_size: odd filter size k (paper: 3 for CIFAR, 9 for ImageNet-100); padding is ``k // 2``.
        blur: p_b, the upper bound of the uniform filter entries (paper: 0.3 CIFAR, 0.06 ImageNet-100).
        universal: one filter (class 0's) for every class, the paper's "universal blur" ablation.
        grayscale: after filtering, set every colour channel to the channel mean.
        fraction: share of samples protected; the choice is a pure function of the key and each
            sample's key (not of dataset order, unlike the official code), so any sharding agrees.
        quantize: ``"truncate"`` (the official code's ``astype(uint8)``) or ``"round"`` (half up).

    Returns:
        A `Protection` with tensors ``filters`` (float32 ``(num_classes, k, k)``) and
        ``fraction_salt`` (uint8 ``(32,)``); the key itself is not stored.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise UEDatasetsError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise UEDatasetsError(f"num_classes must be >= 1, got {num_classes}")
    check_key(key)
    check_filter_options(kernel_size, blur)
    if not 0 <= fraction <= 1:
        raise UEDatasetsError(f"fraction must lie in [0, 1], got {fraction}")
    if quantize not in QUANTIZE_MODES:
        raise UEDatasetsError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    filters = draw_filters(num_classes, key, kernel_size, blur)
    if universal:
        filters[:] = filters[0]
    params = {
        "num_classes": num_classes,
        "kernel_size": kernel_size,
        "blur": blur,
        "center": 1.0,
        "universal": universal,
        "grayscale": grayscale,
        "fraction": fraction,
        "quantize": quantize,
        "padding": "zeros",
        "paper": "CUDA: Sadasivan, Soltanolkotabi, Feizi, CVPR 2023 (arXiv 2303.04278)",
    }
    tensors = {"filters": torch.from_numpy(filters).to(torch.float32), "fraction_salt": fraction_salt(key)}
    return Protection(METHOD, params, tensors)
