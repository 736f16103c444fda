"""How a sample is recognised: its key, and a checksum of its pixels.

Protections that store something per fitted sample (Unlearnable Clusters' assignments, the noise
banks of sample-wise methods) find it by the sample's key and check it against the pixels, so a key
that names another image (row indices of another split) is never given someone else's noise. Fit
computes these, apply recomputes them: one definition for both.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import torch

#: Pixel values converted to int64 at a time by `pixel_checksum`.
_CHUNK_VALUES = 1 << 22


def colour_planes(x: torch.Tensor) -> torch.Tensor:
    """The colour planes of ``(..., C, H, W)`` images, as protections see them: C = 1 (L) or 3 (RGB);
    a 2nd or 4th channel is alpha and is left out (a view, no copy)."""
    return x[..., : 3 if x.shape[-3] >= 3 else 1, :, :]


def pixel_checksum(x: torch.Tensor) -> torch.Tensor:
    """Two position-weighted sums of each image's bytes, exact on every device.

    Args:
        x: uint8 ``(B, C, H, W)``.

    Returns:
        int64 ``(B, 2)``. Weights are below 2**24, so sums stay exact up to 2**30 values per image.
    """
    flat = x.reshape(x.shape[0], -1)
    idx = torch.arange(flat.shape[1], device=x.device, dtype=torch.int64)
    weights = torch.stack([(idx * 2654435761 + 97) % 16777213 + 1, (idx * 40503 + 12345) % 16777199 + 1], dim=1)
    out = torch.empty(x.shape[0], 2, dtype=torch.int64, device=x.device)
    step = max(1, _CHUNK_VALUES // max(1, 2 * flat.shape[1]))  # rows per int64 product: bounded memory
    for s in range(0, flat.shape[0], step):  # element-wise products: integer matmul has no CUDA kernel
        out[s : s + step] = (flat[s : s + step].to(torch.int64).unsqueeze(-1) * weights).sum(1)
    return out


def encode_keys(keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as safetensors can hold them: UTF-8 bytes ``(L,)`` uint8 and offsets ``(N + 1,)`` int64."""
    data = [k.encode() for k in keys]
    offsets = torch.zeros(len(data) + 1, dtype=torch.int64)
    if data:
        offsets[1:] = torch.tensor([len(d) for d in data], dtype=torch.int64).cumsum(0)
    return torch.frombuffer(bytearray(b"".join(data)) or bytearray(1), dtype=torch.uint8)[: int(offsets[-1])].clone(), offsets


def decode_keys(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    """Inverse of `encode_keys`."""
    raw = bytes(data.cpu().numpy().tobytes())
    bounds = offsets.tolist()
    return [raw[a:b].decode() for a, b in itertools.pairwise(bounds)]


def key_hashes(keys: Sequence[str]) -> list[int]:
    """64-bit unsigned ``blake2b`` digests of the keys' UTF-8 bytes (the order of a bank's index)."""
    return [int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little") for k in keys]
