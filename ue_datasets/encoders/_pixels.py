"""The ``pixels`` kind: raw pixels as features, a weightless and deterministic encoder.

``pixels`` (28 x 28) or ``pixels:SIZE``: the image is preprocessed as usual (``squash`` to
SIZE x SIZE, bilinear, mean 0.5 / std 0.5, so values lie in [-1, 1]); the three normalised channels
are averaged to one plane and flattened: ``(B, SIZE * SIZE)`` float32. A gray image thus gives its
SIZE * SIZE pixels. Differentiable w.r.t. the input (Unlearnable Clusters optimises through it). A
baseline surrogate (what clusters of raw pixels give); not a network, so it never warns
`RandomEncoderWarning`. Its digest is the fixed `PIXELS_DIGEST`, so artifacts record and check one.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .registry import Loaded, register_kind
from .spec import EncoderError, EncoderSpec, Overrides, _finish

#: Default side of the pixel grid.
PIXELS_SIZE = 28
#: The fixed digest of the pixels encoder (it has no weights): sha256 of its description.
PIXELS_DIGEST = "sha256:" + hashlib.sha256(b"ue_datasets pixels encoder: mean of the 3 channels, flattened").hexdigest()


class PixelFeatures(nn.Module):
    """``(B, 3, S, S)`` float32 preprocessed images -> ``(B, S * S)`` float32: channel mean, flattened."""

    def __init__(self) -> None:
        super().__init__()
        # an empty, non-persistent buffer: tells the Encoder which device it is on (no state_dict entry)
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=1).flatten(1)


def _parse_pixels(rest: str, over: Overrides) -> EncoderSpec:
    """``pixels`` (``rest == ""``) or ``pixels:SIZE``."""
    size = PIXELS_SIZE
    if rest:
        try:
            size = int(rest)
        except ValueError:
            size = 0
        if size <= 0 or str(size) != rest.strip():
            raise EncoderError(f"pixels:SIZE needs a positive integer SIZE, got {rest!r} (e.g. 'pixels:28')")
    base = {
        "size": size,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "resize_mode": "squash",
        "interpolation": "bilinear",
    }
    return _finish("pixels", "pixels", None, base, None, over)


def _load_pixels(spec: EncoderSpec, device: torch.device) -> Loaded:
    """`PixelFeatures` (no weights), ``D = size * size``, digest `PIXELS_DIGEST`."""
    if spec.weights is not None:
        raise EncoderError(f"the pixels encoder has no weights, got weights={spec.weights!r}")
    return Loaded(PixelFeatures().to(device), dim=spec.size * spec.size, digest=PIXELS_DIGEST)


register_kind(
    "pixels",
    parse=_parse_pixels,
    load=_load_pixels,
    usage=("'pixels' or 'pixels:SIZE' (raw pixels, no weights)",),
    bare=True,
)
