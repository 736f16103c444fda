"""Stage 3, apply: the one tensor-level core behind every adapter.

`protect_batch` takes uint8 or float images, one condition per sample (a class id for class-wise
methods; a sample key where a method or a partial protection needs one; a text, caption or class-name
prompt, for T2UE) and returns protected images of the same dtype and layout, on the device they came
on. The adapters (torchvision transform, ``datasets.map`` function, webdataset stage and shard
rewriter, CLI) all call it, so they all give the same pixels for the same input.

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
from ..kernels.samples import colour_planes
from . import bank as _bank  # noqa: F401  (registers the "key" lookup)
from . import clusters as _clusters  # noqa: F401  (registers the "cluster" lookup)
from . import generators as _generators  # noqa: F401  (registers the "text" and "text-sample" lookups)
from .convolution import apply_convolution, apply_filters
from .noise import NOISE_METHODS, apply_noise, kernel_of, lookup_of

Kernel = Callable[..., torch.Tensor]

#: What `protect_batch` does with samples a protection holds no delta for (a sample-wise bank fitted
#: on other data): ``error`` names them, ``pass`` leaves them unprotected (the adapters count them).
UNFITTED = ("error", "pass")


@dataclass(frozen=True)
class Method:
    """How the core calls one method's kernel.

    Attributes:
        kernel: ``kernel(protection, x uint8 (B, C, H, W), **conditions) -> uint8 (B, C, H, W)``.
        needs: conditions (``labels``, ``keys``, ``texts``) the kernel cannot do without.
        uses: conditions the kernel uses when they are given.
        label_range: name of the parameter that bounds labels (``num_classes``), if any.
        covers: ``covers(protection, x, keys) -> bool (B,)``, which samples it can protect; ``None``: all.
        channels_last: the kernel takes a channels-last batch as it lies, and gives its output in the same
            layout and the same bytes: images decoded from files (``(H, W, C)`` arrays) need no
            transposing copy into the core nor out of it. Other kernels get contiguous batches.
    """

    kernel: Kernel
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    label_range: str | None = None
    covers: Callable[..., torch.Tensor] | None = None
    channels_last: bool = False


def _identity(protection: Protection, x: torch.Tensor, **_: object) -> torch.Tensor:
    return x


METHODS: dict[str, Method] = {
    "convolution": Method(apply_convolution, needs=frozenset({"labels"}), label_range="num_classes",
                          channels_last=True),
    # Decodes and re-encodes without changing a pixel: the floor of benchmarks and audit baselines.
    "identity": Method(_identity, channels_last=True),
}


def identity_protection() -> Protection:
    """A protection that changes nothing (same codec path, same stats): a baseline."""
    return Protection("identity", {}, {})


def method_of(protection: Protection) -> Method:
    """How to apply ``protection``: its method's kernel, or the noise (or filter) kernel with its lookup's
    conditions."""
    if protection.method in NOISE_METHODS:
        lookup = lookup_of(protection)
        kernel = apply_filters if kernel_of(protection) == "filter" else apply_noise
        return Method(kernel, lookup.needs, lookup.uses, lookup.label_range, lookup.covers)
    try:
        return METHODS[protection.method]
    except KeyError:
        raise UEDatasetsError(
            f"unknown protection method {protection.method!r}; this ue-datasets applies "
            f"{sorted([*METHODS, *NOISE_METHODS])}"
        ) from None


def needs_labels(protection: Protection) -> bool:
    """Whether applying ``protection`` needs a class id per sample."""
    return "labels" in method_of(protection).needs


def needs_keys(protection: Protection) -> bool:
    """Whether applying ``protection`` needs a stable key per sample (a partial or sample-wise one does)."""
    return protection.params.get("fraction", 1.0) < 1.0 or "keys" in method_of(protection).needs


def uses_keys(protection: Protection) -> bool:
    """Whether applying ``protection`` needs or makes use of sample keys when they are given."""
    return needs_keys(protection) or "keys" in method_of(protection).uses


def uncovered(protection: Protection, x: torch.Tensor, keys: Sequence[str] | None) -> torch.Tensor:
    """Which images of ``x`` (uint8 ``(B, C, H, W)``) ``protection`` holds no delta for: bool ``(B,)``."""
    covers = method_of(protection).covers
    if covers is None:
        return torch.zeros(x.shape[0], dtype=torch.bool)
    return ~covers(protection, x, keys).cpu()


def needs_texts(protection: Protection) -> bool:
    """Whether applying ``protection`` needs a text per sample (T2UE: a caption or a class-name prompt)."""
    return "texts" in method_of(protection).needs


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


def _check_texts(texts: Sequence[str] | None, n: int) -> None:
    """Raise unless ``texts`` is one ``str`` per image of ``n``."""
    if texts is None or len(texts) != n:
        got = "no texts" if texts is None else f"{len(texts)} texts"
        raise UEDatasetsError(f"this protection finds each sample's noise by its text: pass one text per image "
                              f"({got} for {n})")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise UEDatasetsError(f"texts must be str, got {type(bad).__name__} ({bad!r:.40})")


def _protect_uint8(
    protection: Protection, x: torch.Tensor, labels: torch.Tensor | None, keys: Sequence[str] | None, unfitted: str,
    texts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Core on one stack of same-size uint8 images ``(B, C, H, W)``, C in 1..4, any strides, with one text
    per image where the method takes texts."""
    method = method_of(protection)
    # Contiguous NCHW, or channels-last where the kernel reads it as it lies: any other strides (a
    # permuted view, as from PIL arrays) make every pass several times slower.
    if not (method.channels_last and x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    c = x.shape[1]
    if c not in (1, 2, 3, 4):
        raise UEDatasetsError(f"images must have 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels, got {c}")
    colour = colour_planes(x)
    mask = None
    if needs_keys(protection):
        if keys is None or len(keys) != x.shape[0]:
            got = "no keys" if keys is None else f"{len(keys)} keys"
            why = ("covers a fraction of the samples" if protection.params.get("fraction", 1.0) < 1.0
                   else "finds each sample's noise by its key")
            raise UEDatasetsError(f"this protection {why}: pass one key per image ({got} for {x.shape[0]})")
        mask = selected(protection, keys).to(x.device)
    kwargs = {}
    if "labels" in method.needs:
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
    if "keys" in method.needs | method.uses:
        kwargs["keys"] = None if keys is None else [str(k) for k in keys]
    if "texts" in method.needs or ("texts" in method.uses and texts is not None):
        _check_texts(texts, x.shape[0])
        kwargs["texts"] = list(texts)  # type: ignore[arg-type]
    if method.covers is not None:
        missing = uncovered(protection, colour, kwargs.get("keys"))
        if bool(missing.any()):
            if unfitted != "pass":
                named = [str(keys[i]) if keys is not None else f"#{i}" for i in missing.nonzero().squeeze(1).tolist()]
                raise UEDatasetsError(
                    f"the protection holds no noise for {len(named)} of these samples (keys {named[:5]}): it was "
                    "fitted on other samples, or their pixels differ from the fitted ones; protect them with "
                    "--unfitted pass (unfitted='pass') to let them through unprotected"
                )
            covered = ~missing.to(x.device)
            mask = covered if mask is None else mask & covered
    if mask is not None and not bool(mask.all()):
        out = colour.clone()
        if bool(mask.any()):
            idx = mask.nonzero().squeeze(1)
            sub = {k: _take(v, idx) for k, v in kwargs.items()}
            out[idx] = method.kernel(protection, colour[idx], **sub)
    else:
        out = method.kernel(protection, colour, **kwargs)
    return torch.cat([out, x[:, out.shape[1] :]], dim=1) if c in (2, 4) else out


def _stack(images: list[torch.Tensor], channels_last: bool) -> torch.Tensor:
    """``(B, C, H, W)`` of same-shape ``(C, H, W)`` images; channels-last when asked for and they all lie
    so (the ``(H, W, C)`` arrays of decoded images): a plain copy, not a transposing one."""
    if channels_last and all(im.permute(1, 2, 0).is_contiguous() for im in images):
        return torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def protect_batch(
    protection: Protection,
    images: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | Sequence[int] | None = None,
    keys: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    unfitted: str = "error",
    texts: Sequence[str] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Protect a batch of images.

    Args:
        protection: a fitted `Protection`.
        images: ``(B, C, H, W)`` tensor, or a list of ``(C, H, W)`` tensors of mixed sizes; uint8 in
            0..255 or float in [0, 1] (float is quantised to uint8 first, the result returned as
            float ``/ 255``). C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA); alpha is kept.
        labels: one class id per image, where the method needs them.
        keys: one stable sample key per image, where the protection covers a fraction or finds noise
            by key (a noise bank); Unlearnable Clusters uses them when given.
        device: where to compute; ``None`` computes where the images are, ``"auto"`` on CUDA when
            available. The result goes back to the images' device.
        unfitted: samples the protection holds no noise for (one of `UNFITTED`): ``"error"`` raises
            naming their keys, ``"pass"`` returns them unchanged (`uncovered` tells which they are).
        texts: one text (``str``) per image, where the protection finds noise by text (T2UE,
            `needs_texts`): the sample's caption or its class-name prompt (`ue_datasets.apply.texts`).

    Returns:
        Protected images of the same type, dtype, shapes and device as ``images`` (where the kernel reads
        channels-last batches as they lie, a list's images come back in the layout they came in: views
        of ``(H, W, C)`` memory for decoded images). Deterministic: the bytes of an image depend only on
        it, its conditions and the protection.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise UEDatasetsError(f"a batch tensor must be (B, C, H, W), got shape {tuple(images.shape)}")
        home, dtype = images.device, images.dtype
        dev = home if device is None else resolve_device(device)
        prot = protection.to(dev)
        lab = None if labels is None else torch.as_tensor(labels).to(dev)
        if unfitted not in UNFITTED:
            raise UEDatasetsError(f"unfitted must be one of {UNFITTED}, got {unfitted!r}")
        out = _protect_uint8(prot, _to_uint8(images.to(dev)), lab, keys, unfitted, texts)
        return (out if dtype == torch.uint8 else out.to(dtype).div_(255)).to(home)
    images = list(images)
    if not images:
        return []
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if texts is not None or needs_texts(protection):
        _check_texts(texts, len(images))
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim != 3:
            raise UEDatasetsError(f"image {i} must be (C, H, W), got shape {tuple(im.shape)}")
        groups.setdefault((tuple(im.shape), im.dtype, im.device), []).append(i)
    result: list[torch.Tensor | None] = [None] * len(images)
    channels_last = method_of(protection).channels_last
    for idx in groups.values():
        out = protect_batch(
            protection,
            _stack([images[i] for i in idx], channels_last),
            None if labels is None else labels[idx],
            None if keys is None else [keys[i] for i in idx],
            device,
            unfitted,
            None if texts is None else [texts[i] for i in idx],
        )
        for j, i in enumerate(idx):
            result[i] = out[j]
    return result  # type: ignore[return-value]
