"""The T2UE generator: shapes, the eps bound, determinism, text independence at init, gradients."""

from __future__ import annotations

import pytest
import torch

from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit.t2ue_generator import T2UEGenerator, latent

TEXT_DIM, NZ, NGF, RES, B = 32, 16, 8, 32, 3


def tiny(seed: int = 0) -> T2UEGenerator:
    torch.manual_seed(seed)
    return T2UEGenerator(TEXT_DIM, nz=NZ, ngf=NGF, resolution=RES)


def text(seed: int) -> torch.Tensor:
    return torch.randn(B, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def randomise_zero_layers(g: T2UEGenerator) -> None:
    """Moves the model off its init: nonzero ``gamma_res`` and text MLP last layers."""
    with torch.no_grad():
        for block in g.blocks:
            block.gamma_res.fill_(1.0)
            for affine in (block.affine1, block.affine2):
                for mlp in (affine.gamma, affine.beta):
                    mlp[-1].weight.normal_(0, 0.1)
                    mlp[-1].bias.normal_(0, 0.1)


def test_shape_and_range():
    g = tiny()
    out = g(text(1), latent(0, B, NZ))
    assert out.shape == (B, 3, RES, RES) and out.dtype == torch.float32
    assert out.abs().max() <= 1


def test_noise_bound_and_nearest_resize():
    g = tiny().eval()
    e, z, eps = text(1), latent(0, B, NZ), 0.02
    full = g.noise(e, z, eps)
    assert full.shape == (B, 3, RES, RES) and full.abs().max() <= eps
    small = g.noise(e, z, eps, size=28)
    assert small.shape == (B, 3, 28, 28) and small.abs().max() <= eps
    idx = torch.arange(28) * RES // 28  # nearest picks source pixel floor(i * in / out)
    assert torch.equal(small, full[:, :, idx][:, :, :, idx])


def test_deterministic():
    assert torch.equal(latent(5, B, NZ), latent(5, B, NZ))
    assert not torch.equal(latent(5, B, NZ), latent(6, B, NZ))
    assert latent(5, B, NZ).shape == (B, NZ)
    e, z = text(1), latent(0, B, NZ)
    a, b = tiny().eval(), tiny().eval()
    assert torch.equal(a(e, z), a(e, z))
    assert torch.equal(a(e, z), b(e, z))


def test_text_independent_at_init_then_dependent_after_training():
    g = tiny()
    z, e1, e2 = latent(0, B, NZ), text(1), text(2)
    assert torch.equal(g(e1, z), g(e2, z))
    # At init d(out)/d(text MLP) carries a factor gamma_res == 0, so one step moves only gamma_res
    # and the text MLPs move on the second step.
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        (g(e1, z) * e1[:, :3, None, None]).square().mean().backward()
        opt.step()
    assert not torch.allclose(g(e1, z), g(e2, z))


def test_channel_plan_256():
    g = T2UEGenerator(512, ngf=64, resolution=256)
    assert len(g.blocks) == 7
    assert [blk.conv2.out_channels for blk in g.blocks] == [512, 512, 512, 512, 256, 128, 64]
    assert g.channels == [512, 512, 512, 512, 256, 128, 64]
    assert g.fc.out_features == 512 * 4 * 4


def test_prefix_plan_and_bad_resolution():
    assert tiny().channels == [8 * NGF] * 4
    assert T2UEGenerator(TEXT_DIM, ngf=NGF, resolution=64).channels == [64, 64, 64, 64, 32]
    with pytest.raises(UEDatasetsError):
        T2UEGenerator(TEXT_DIM, resolution=48)
    with pytest.raises(UEDatasetsError):
        T2UEGenerator(TEXT_DIM, resolution=4)


def test_gradients_reach_every_parameter():
    g = tiny()
    g(text(1), latent(0, B, NZ)).sum().backward()
    assert all(p.grad is not None for p in g.parameters())  # all used, though many are 0 at init
    g.zero_grad(set_to_none=True)
    randomise_zero_layers(g)
    g(text(1), latent(0, B, NZ)).sum().backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
