"""The perturbation generator of Unlearnable Clusters: a CycleGAN-style ResNet generator.

Reconstructed from the description in ``methods.md`` §2.5 (the reference repository has no licence
file, so this is our own code): ngf 64, batch norm, ReLU, reflect padding, no dropout, bias only in
the last convolution; two stride-2 downsamplings, 6 residual blocks at 4 x ngf, two transposed
convolutions back up, a 7x7 convolution and ``tanh``. The input side must be a multiple of 4.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """``x + [pad 1, conv 3, BN, ReLU, pad 1, conv 3, BN](x)`` at a fixed width."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Maps a fixed noise input ``(1, in_channels, H, W)`` to ``(1, out_channels, H, W)`` in (-1, 1).

    H and W must be multiples of 4. Kept in train mode when producing the perturbation, as the
    reference does: batch norm then normalises with the single input's own statistics.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, blocks: int = 6):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(ngf * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                          bias=False),
                       nn.BatchNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
