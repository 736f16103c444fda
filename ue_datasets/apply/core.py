"""Stage 3, apply: the one tensor-level core behind every adapter.

`protect_batch` takes uint8 or float images, one condition per sample (a class id for class-wise
methods; a sample key where a method or a partial protection needs one) and returns protected images
of the same dtype and layout, on the device they came on. The adapters (torchvision transform,
``datasets.map`` function, webdataset stage and shard rewriter, CLI) all call it, so they all give the
same pixels for the same input.

Channels: 1 (grayscale) and 3 (RGB) channels are protected; a 2nd or 4th channel is alpha and is
kept byte for byte. Palette images are converted to RGB or RGBA before they get here (`images`).
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from ..artifact import Protection
from ..errors import UEDatasetsError
from .clusters import apply_clusters
from .convolution import apply_convolution

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Method:
    """How the core calls one method's kernel.

    Attributes:
        kernel: ``kernel(protection, x uint8 (B, C, H, W), **conditions) -> uint8 (B, C, H, W)``.
        labels: the kernel takes class ids (``labels``).
        label_range: name of the parameter that bounds labels (``num_classes``), if any.
        keys: the kernel takes the sample keys (``keys``, a list of str or ``None``) when given.
    """

    kernel: Kernel
    labels: bool = False
    label_range: str | None = None
    keys: bool = False


def _identity(protection: Protection, x: torch.Tensor, **_: object) -> torch.Tensor:
    return x


METHODS: dict[str, Method] = {
    "convolution": Method(apply_convolution, labels=True, label_range="num_classes"),
    # Unlearnable Clusters: label-agnostic; keys find fitted samples' stored clusters.
    "clusters": Method(apply_clusters, keys=True),
    # Decodes and re-encodes without changing a pixel: the floor of benchmarks and audit baselines.
    "identity": Method(_identity),
}


def identity_protection() -> Protection:
    """A protection that changes nothing (same codec path, same stats): a baseline."""
    return Protection("identity", {}, {})


def method_of(protection: Protection) -> Method:
    try:
        return METHODS[protection.method]
    except KeyError:
        raise UEDatasetsError(
            f"unknown protection method {protection.method!r}; this ue-datasets applies {sorted(METHODS)}"
        ) from None


def needs_labels(protection: Protection) -> bool:
    """Whether applying ``protection`` needs a class id per sample."""
    return method_of(protection).labels


def needs_keys(protection: Protection) -> bool:
    """Whether applying ``protection`` needs a stable key per sample (a partial protection does)."""
    return protection.params.get("fraction", 1.0) < 1.0


def uses_keys(protection: Protection) -> bool:
    """Whether applying ``protection`` needs or makes use of sample keys when they are given."""
    return needs_keys(protection) or method_of(protection).keys


def check_label(protection: Protection, label: object) -> str | None:
    """Why ``label`` is unusable with ``protection`` (``None`` when it is fine)."""
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        return f"label {label!r} is not an integer"
    label = int(label)
    bound = method_of(protection).label_range
    if bound is not None and not 0 <= label < protection.params[bound]:
        return f"label {label} is out of range [0, {protection.params[bound]})"
    return None


def selected(protection: Protection, keys: Sequence[str]) -> torch.Tensor:
    """Which samples a partial protection covers: a pure function of the secret salt and each key.

    Returns:
        bool ``(len(keys),)``: ``blake2b(key, salt) / 2**64 < fraction``.
    """
    fraction = protection.params.get("fraction", 1.0)
    if fraction >= 1.0:
        return torch.ones(len(keys), dtype=torch.bool)
    salt = bytes(protection.tensors["fraction_salt"].cpu().tolist())
    draws = [
        int.from_bytes(hashlib.blake2b(str(k).encode(), key=salt, digest_size=8).digest(), "big") / 2**64
        for k in keys
    ]
    return torch.tensor([d < fraction for d in draws], dtype=torch.bool)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``"auto"`` or ``None``: CUDA when available, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UEDatasetsError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return device


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise UEDatasetsError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _take(v: torch.Tensor | list | None, idx: torch.Tensor) -> torch.Tensor | list | None:
    if v is None or isinstance(v, torch.Tensor):
        return v if v is None else v[idx.to(v.device)]
    return [v[i] for i in idx.tolist()]


def _protect_uint8(
    protection: Protection, x: torch.Tensor, labels: torch.Tensor | None, keys: Sequence[str] | None
) -> torch.Tensor:
    """Core on one stack of same-size uint8 images ``(B, C, H, W)``, C in 1..4."""
    method = method_of(protection)
    c = x.shape[1]
    if c not in (1, 2, 3, 4):
        raise UEDatasetsError(f"images must have 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels, got {c}")
    colour = x[:, : 3 if c >= 3 else 1]
    mask = None
    if needs_keys(protection):
        if keys is None or len(keys) != x.shape[0]:
            got = "no keys" if keys is None else f"{len(keys)} keys"
            raise UEDatasetsError(f"this protection covers a fraction of the samples: pass one key per image ({got} for {x.shape[0]})")
        mask = selected(protection, keys).to(x.device)
    kwargs = {}
    if method.labels:
        if labels is None:
            raise UEDatasetsError(f"method {protection.method!r} needs a class label per sample")
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.numel() != x.shape[0]:
            raise UEDatasetsError(f"got {labels.numel()} labels for {x.shape[0]} images")
        bound = protection.params.get(method.label_range) if method.label_range else None
        if bound is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= bound):
            bad = [i for i, v in enumerate(labels.tolist()) if not 0 <= v < bound]
            raise UEDatasetsError(f"labels out of range [0, {bound}) at batch positions {bad[:10]}")
        kwargs["labels"] = labels
    if method.keys:
        kwargs["keys"] = None if keys is None else [str(k) for k in keys]
    if mask is not None and not bool(mask.all()):
        out = colour.clone()
        if bool(mask.any()):
            idx = mask.nonzero().squeeze(1)
            sub = {k: _take(v, idx) for k, v in kwargs.items()}
            out[idx] = method.kernel(protection, colour[idx], **sub)
    else:
        out = method.kernel(protection, colour, **kwargs)
    return torch.cat([out, x[:, out.shape[1] :]], dim=1) if c in (2, 4) else out


def protect_batch(
    protection: Protection,
    images: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Protect a batch of images.

    Args:
        protection: a fitted `Protection`.
        images: ``(B, C, H, W)`` tensor, or a list of ``(C, H, W)`` tensors of mixed sizes; uint8 in
            0..255 or float in [0, 1] (float is quantised to uint8 first, the result returned as
            float ``/ 255``). C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA); alpha is kept.
        labels: one class id per image, where the method needs them.
        keys: one stable sample key per image, where the protection covers a fraction; methods that
            store per-sample state (Unlearnable Clusters) use them when given.
        device: where to compute; ``None`` computes where the images are, ``"auto"`` on CUDA when
            available. The result goes back to the images' device.

    Returns:
        Protected images of the same type, dtype, shapes and device as ``images``. Deterministic:
        the bytes of an image depend only on it, its condition and the protection.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise UEDatasetsError(f"a batch tensor must be (B, C, H, W), got shape {tuple(images.shape)}")
        home, dtype = images.device, images.dtype
        dev = home if device is None else resolve_device(device)
        prot = protection.to(dev)
        lab = None if labels is None else torch.as_tensor(labels).to(dev)
        # Contiguous NCHW: a permuted view (as from PIL arrays) makes every pass several times slower.
        out = _protect_uint8(prot, _to_uint8(images.to(dev)).contiguous(), lab, keys)
        return (out if dtype == torch.uint8 else out.to(dtype).div_(255)).to(home)
    images = list(images)
    if not images:
        return []
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim != 3:
            raise UEDatasetsError(f"image {i} must be (C, H, W), got shape {tuple(im.shape)}")
        groups.setdefault((tuple(im.shape), im.dtype, im.device), []).append(i)
    result: list[torch.Tensor | None] = [None] * len(images)
    for idx in groups.values():
        stack = torch.stack([images[i] for i in idx])
        out = protect_batch(
            protection,
            stack,
            None if labels is None else labels[idx],
            None if keys is None else [keys[i] for i in idx],
            device,
        )
        for j, i in enumerate(idx):
            result[i] = out[j]
    return result  # type: ignore[return-value]
