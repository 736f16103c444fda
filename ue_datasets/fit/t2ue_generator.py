"""The T2UE noise generator: an SSA-GAN ``NetG`` conditioned on a frozen CLIP text embedding.

Reconstruction from Ma et al. 2025, "Generating Unlearnable Examples from Text Descriptions",
§3.1, and the authors' development code; this is not official code (none is published). A latent
``z`` is mapped to a 4 x 4 map, then blocks of semantic-spatial aware conditional batch norm
(SSCBN) grow it by doubling the side, each modulated by the text embedding ``e`` inside a spatial
mask predicted from the previous block's output. At 256 px the blocks output
``[8, 8, 8, 8, 4, 2, 1] x ngf`` channels at sides 4, 8, ..., 256; a smaller power-of-two
resolution uses only the first blocks of that plan.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UEDatasetsError

#: How the tanh output is brought within the budget (`T2UEGenerator.noise`).
BOUNDS = ("scale", "clamp")
CHANNEL_MULTS = (8, 8, 8, 8, 4, 2, 1)
"""Output channels of blocks 0..6 in units of ``ngf``; block ``i`` works at side ``4 * 2**i``."""


def mask_head(channels: int) -> nn.Sequential:
    """Maps features ``(B, channels, H, W)`` to mask logits ``(B, 1, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(channels, 100, 3, padding=1), nn.BatchNorm2d(100), nn.ReLU(True), nn.Conv2d(100, 1, 1),
    )


class SSCBN(nn.Module):
    """Text-conditioned batch norm applied inside a spatial mask.

    ``(gamma(e) * mask + 1) * BN(x) + beta(e) * mask`` for ``x`` ``(B, C, H, W)``, ``e``
    ``(B, text_dim)`` and ``mask`` ``(B, 1, H, W)`` in [0, 1]. The last linear layers of ``gamma``
    and ``beta`` start at zero, so the layer starts as a plain (non-affine) batch norm.
    """

    def __init__(self, channels: int, text_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Sequential(nn.Linear(text_dim, 256), nn.ReLU(True), nn.Linear(256, channels))
        self.beta = nn.Sequential(nn.Linear(text_dim, 256), nn.ReLU(True), nn.Linear(256, channels))
        for mlp in (self.gamma, self.beta):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma(e)[:, :, None, None]
        beta = self.beta(e)[:, :, None, None]
        return (gamma * mask + 1) * self.bn(x) + beta * mask


class SSACN(nn.Module):
    """``shortcut(x) + gamma_res * residual(x, e, mask)`` at a fixed side, ``in_ch`` -> ``out_ch``.

    ``residual`` is SSCBN, ReLU, conv 3, SSCBN, ReLU, conv 3; ``shortcut`` is a 1x1 conv when the
    width changes, else the identity. ``gamma_res`` is a learnable scalar that starts at 0.
    """

    def __init__(self, in_ch: int, out_ch: int, text_dim: int):
        super().__init__()
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.affine1 = SSCBN(in_ch, text_dim)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine2 = SSCBN(out_ch, text_dim)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.gamma_res = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.affine1(x, e, mask)))
        h = self.conv2(F.relu(self.affine2(h, e, mask)))
        return self.shortcut(x) + self.gamma_res * h


class T2UEGenerator(nn.Module):
    """Maps a text embedding ``e`` and a latent ``z`` to an image-shaped ``(B, 3, R, R)`` in [-1, 1].

    ``resolution`` R is a power of two in [8, 256]; ``log2(R) - 1`` blocks are used. ``ngf``
    defaults to 64, the reference channel plan (the development code sets ``text_dim // 8``,
    which is the same for CLIP's 512-dimensional embeddings); smaller values suit CPU tests.
    """

    def __init__(self, text_dim: int, nz: int = 100, ngf: int | None = None, resolution: int = 256):
        super().__init__()
        if resolution < 8 or resolution > 4 * 2 ** (len(CHANNEL_MULTS) - 1) or resolution & (resolution - 1):
            raise UEDatasetsError(f"resolution must be a power of two in [8, 256], got {resolution}")
        ngf = 64 if ngf is None else ngf
        self.text_dim, self.nz, self.ngf, self.resolution = text_dim, nz, ngf, resolution
        n_blocks = resolution.bit_length() - 2  # side 4 * 2**(n_blocks - 1) == resolution
        self.channels = [m * ngf for m in CHANNEL_MULTS[:n_blocks]]
        self.fc = nn.Linear(nz, 8 * ngf * 4 * 4)
        ins = [8 * ngf] + self.channels[:-1]
        self.blocks = nn.ModuleList(SSACN(i, o, text_dim) for i, o in zip(ins, self.channels))
        # masks[0] reads the 4 x 4 map; masks[i + 1] reads block i's output, for all but the last block.
        self.masks = nn.ModuleList(mask_head(c) for c in ins[:1] + self.channels[:-1])
        last = self.channels[-1]
        self.head = nn.Sequential(
            nn.BatchNorm2d(last), nn.LeakyReLU(0.2, True), nn.Conv2d(last, 3, 3, padding=1), nn.Tanh(),
        )

    def forward(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``e`` ``(B, text_dim)`` and ``z`` ``(B, nz)`` float32 -> ``(B, 3, R, R)`` float32 in [-1, 1]."""
        h = self.fc(z).view(z.shape[0], 8 * self.ngf, 4, 4)
        logits = self.masks[0](h)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
            h = block(h, e, torch.sigmoid(logits))
            if i + 1 < len(self.blocks):
                logits = self.masks[i + 1](h)
        return self.head(h)

    def noise(self, e: torch.Tensor, z: torch.Tensor, eps: float, size: int | None = None,
              bound: str = "scale") -> torch.Tensor:
        """The perturbation ``(B, 3, size, size)``, float32, with L-inf norm at most ``eps``.

        ``bound`` (one of `BOUNDS`): ``scale`` multiplies the tanh output by ``eps`` (every element keeps
        a gradient); ``clamp`` clamps it to ``[-eps, eps]`` as the development code does (elements beyond
        the budget get no gradient). Then resized nearest to ``size`` (default: the generator's resolution).
        """
        if bound not in BOUNDS:
            raise UEDatasetsError(f"bound must be one of {BOUNDS}, got {bound!r}")
        out = self.forward(e, z)
        delta = out * eps if bound == "scale" else out.clamp(-eps, eps)
        size = self.resolution if size is None else size
        return delta if size == self.resolution else F.interpolate(delta, size=(size, size), mode="nearest")


def latent(seed: int, n: int, nz: int = 100) -> torch.Tensor:
    """``(n, nz)`` float32 draws from N(0, I), fixed by ``seed``; drawn on the CPU for any device."""
    return torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))
