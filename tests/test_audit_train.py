"""Audit models and the training loop: shapes, determinism, learning, a shortcut, PGD, SimCLR probe.

Everything trains small-cnn on tiny synthetic 16x16 tasks: 10 classes, each a fixed coarse (4x4-block)
+-1 pattern plus Gaussian noise, so that a clean-trained model must learn the content to score.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ue_datasets import UEDatasetsError
from ue_datasets.audit.models import MODELS, build_model, list_models, models_help
from ue_datasets.audit.train import (
    TrainConfig,
    TrainResult,
    _batches,
    _num_batches,
    ssl_augment,
    evaluate,
    linear_probe_ssl,
    nt_xent,
    pgd_attack,
    train_classifier,
    train_model,
)

K = 10
SIZE = 16
FAST = TrainConfig(epochs=2, batch_size=32)


def _patterns(channels: int, block: int, seed: int) -> torch.Tensor:
    """float ``(K, channels, SIZE, SIZE)`` of +-1 in ``block x block`` squares, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 2, (K, channels, SIZE // block, SIZE // block), generator=g).float() * 2 - 1
    return F.interpolate(p, scale_factor=block, mode="nearest")


def make_task(n: int, seed: int, channels: int = 1, shortcut: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(n, channels, 16, 16)`` images and int64 labels of the synthetic task.

    Content: ``0.5 + 0.12 * coarse class pattern + 0.12 * N(0, 1)``. ``shortcut > 0`` adds a class-wise
    pixel-level +-1 pattern of that amplitude (noise-free, no clipping of the content at 0.25): a
    trivially separable feature, like a class-wise unlearnable perturbation.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = 0.5 + 0.12 * _patterns(channels, 4, 123)[y] + 0.12 * torch.randn(n, channels, SIZE, SIZE, generator=g)
    if shortcut:
        x = x + shortcut * _patterns(channels, 1, 456)[y]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@pytest.fixture(scope="module")
def clean_task():
    return (*make_task(500, seed=1), *make_task(200, seed=2))


@pytest.fixture(scope="module")
def clean_result(clean_task):
    return train_classifier("small-cnn", *clean_task, K, dataclasses.replace(FAST, epochs=5))


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["small-cnn", "resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_models_map_unit_images_to_logits(name, channels):
    torch.manual_seed(0)
    model = build_model(name, 7, channels, 16).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 16, 16))
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resnet18_is_cifar_style():
    model = build_model("resnet18", 10, 3, 32)
    stem = model.features[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.17e6, rel=0.01)


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_model_at_32px(channels):
    model = build_model("mobilenet_v3_small", 5, channels, 32).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, 32, 32)).shape == (2, 5)


def test_unknown_model_lists_the_options():
    with pytest.raises(UEDatasetsError, match="unknown model 'no-such-net'.*small-cnn.*resnet50"):
        build_model("no-such-net", 10, 3, 32)
    assert list_models()[:2] == list(MODELS) and "vgg16_bn" in list_models()
    assert "small-cnn" in models_help()


def test_bad_model_arguments_raise():
    with pytest.raises(UEDatasetsError, match="num_classes"):
        build_model("small-cnn", 0, 3, 32)
    with pytest.raises(UEDatasetsError, match="1- or 3-channel"):
        build_model("mobilenet_v3_small", 10, 4, 32)


# --------------------------------------------------------------------------- training


def test_clean_task_is_learned_and_peak_final_are_consistent(clean_result):
    r = clean_result
    assert isinstance(r, TrainResult)
    assert len(r.test_accuracy) == len(r.train_accuracy) == len(r.train_loss) == 5
    assert r.final == r.test_accuracy[-1] > 0.8
    assert r.peak == max(r.test_accuracy) and r.test_accuracy[r.peak_epoch - 1] == r.peak
    assert r.peak not in r.test_accuracy[: r.peak_epoch - 1]
    assert all(0 <= a <= 1 for a in r.test_accuracy + r.train_accuracy)
    assert r.train_loss[-1] < r.train_loss[0] and r.seconds > 0
    assert r.as_dict()["peak_epoch"] == r.peak_epoch


def test_same_seed_gives_identical_results_and_restores_global_state(clean_task):
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    det_before = torch.are_deterministic_algorithms_enabled()
    a = train_classifier("small-cnn", *clean_task, K, FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == det_before
    b = train_classifier("small-cnn", *clean_task, K, FAST)
    assert (a.test_accuracy, a.train_accuracy, a.train_loss) == (b.test_accuracy, b.train_accuracy, b.train_loss)
    c = train_classifier("small-cnn", *clean_task, K, dataclasses.replace(FAST, seed=1))
    assert c.train_loss != a.train_loss


def test_classwise_shortcut_drives_clean_test_accuracy_down(clean_task, clean_result):
    """Trained on clean content + a class-wise shortcut, the model learns the shortcut, not the content."""
    sx, sy = make_task(500, seed=1, shortcut=0.25)
    assert torch.equal(sy, clean_task[1])  # same images and labels, only the shortcut added
    r = train_classifier("small-cnn", sx, sy, clean_task[2], clean_task[3], K, dataclasses.replace(FAST, epochs=5))
    assert r.train_accuracy[-1] > 0.95  # the protected training set is fitted ...
    assert r.final < clean_result.final - 0.3  # ... but the clean test set is not
    assert r.peak < clean_result.peak - 0.3


def test_augment_path_is_deterministic(clean_task):
    cfg = dataclasses.replace(FAST, augment=True, epochs=1)
    a = train_classifier("small-cnn", *clean_task, K, cfg)
    b = train_classifier("small-cnn", *clean_task, K, cfg)
    assert a.test_accuracy == b.test_accuracy and a.train_loss == b.train_loss
    assert a.train_loss != train_classifier("small-cnn", *clean_task, K, dataclasses.replace(cfg, augment=False)).train_loss


def test_on_epoch_reports_each_epochs_time_without_changing_the_result(clean_task):
    x, y, tx, ty = (t[:64] for t in clean_task)
    calls = []
    with_callback = train_classifier("small-cnn", x, y, tx, ty, K, FAST, on_epoch=lambda e, s: calls.append((e, s)))
    assert [e for e, _ in calls] == [1, 2] and all(0 < s <= with_callback.seconds for _, s in calls)
    assert with_callback.test_accuracy == train_classifier("small-cnn", x, y, tx, ty, K, FAST).test_accuracy


@pytest.mark.parametrize("n", [1, 5, 32, 33, 34, 64, 65])
def test_batches_cover_every_sample_once_and_never_leave_one_alone(n):
    chunks = _batches(n, 32, torch.Generator().manual_seed(0))
    assert len(chunks) == _num_batches(n, 32)
    assert sorted(torch.cat(chunks).tolist()) == list(range(n))
    assert n < 2 or min(len(c) for c in chunks) >= 2


def test_pgd_stays_within_eps_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("small-cnn", K, 1, SIZE)
    x_u8, y = make_task(64, seed=3)
    train_model(model, x_u8, y, x_u8, y, K, FAST)
    x = x_u8.float() / 255
    eps = 8 / 255
    model.train()
    model.zero_grad(set_to_none=True)
    adv = pgd_attack(model, x, y, eps, steps=5, step=None, generator=torch.Generator().manual_seed(0))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    again = pgd_attack(model, x, y, eps, steps=5, step=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)


def test_adversarial_training_path_runs(clean_task):
    tx, ty, vx, vy = clean_task
    cfg = dataclasses.replace(FAST, epochs=1, adversarial_eps=4 / 255, pgd_steps=2, augment=True)
    r = train_classifier("small-cnn", tx[:128], ty[:128], vx, vy, K, cfg)
    assert len(r.test_accuracy) == 1 and 0 <= r.final <= 1
    assert cfg.effective_pgd_step == pytest.approx(1 / 255)


def test_train_model_on_features_and_evaluate():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 8, generator=g)
    y = (feats[:, 0] > 0).long()
    probe = torch.nn.Linear(8, 2)
    r = train_model(probe, feats, y, feats, y, 2, dataclasses.replace(FAST, epochs=3))
    assert r.final > 0.9 and evaluate(probe, feats, y) == r.final


@pytest.mark.parametrize(
    "change, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"adversarial_eps": 8}, "adversarial_eps"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_config_raises(change, match):
    with pytest.raises(UEDatasetsError, match=match):
        TrainConfig(**change)


def test_bad_inputs_raise(clean_task):
    tx, ty, vx, vy = clean_task
    with pytest.raises(UEDatasetsError, match="labels outside"):
        train_classifier("small-cnn", tx, ty + 5, vx, vy, K, FAST)
    with pytest.raises(UEDatasetsError, match="differ in shape"):
        train_classifier("small-cnn", tx, ty, vx[:, :, :8], vy, K, FAST)
    with pytest.raises(UEDatasetsError, match="train_x"):
        train_classifier("small-cnn", tx[:, 0], ty, vx, vy, K, FAST)


# --------------------------------------------------------------------------- SimCLR + linear probe


def test_ssl_augment_and_nt_xent():
    x = torch.rand(6, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    v = ssl_augment(x, g)
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1 and not torch.equal(v, x)
    assert torch.equal(v, ssl_augment(x, torch.Generator().manual_seed(0)))
    z = torch.randn(6, 4)
    aligned = nt_xent(torch.cat([z, z]), 0.5)
    shuffled = nt_xent(torch.cat([z, z.roll(1, 0)]), 0.5)
    assert aligned < shuffled


def test_linear_probe_ssl_runs_on_tiny_data(clean_task):
    tx, ty, vx, vy = clean_task
    cfg = dataclasses.replace(FAST, epochs=3)
    r = linear_probe_ssl(tx[:96], ty[:96], vx[:64], vy[:64], K, cfg, ssl_epochs=2, ssl_batch_size=32)
    assert isinstance(r, TrainResult)
    assert len(r.test_accuracy) == len(r.train_loss) == 3 and len(r.pretrain_loss) == 2
    assert all(0 <= a <= 1 for a in r.test_accuracy) and r.final == r.test_accuracy[-1]
    r2 = linear_probe_ssl(tx[:96], ty[:96], vx[:64], vy[:64], K, cfg, ssl_epochs=2, ssl_batch_size=32)
    assert r2.test_accuracy == r.test_accuracy and r2.pretrain_loss == r.pretrain_loss
