"""UGE fit: its three loss terms, the fit's bound and determinism, and the authorized network."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import gray_shard

from ue_datasets.apply.core import protect_batch
from ue_datasets.audit.models import build_model
from ue_datasets.errors import UEDatasetsError
from ue_datasets.fit.uge import authorized_model, fit_uge
from ue_datasets.fit.uge_losses import (
    distillation_loss,
    feature_distance_loss,
    gradient_matching_loss,
    misalignment_loss,
    undistillation_loss,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A shard of 40 gray 12x12 images of 4 classes whose classes differ in brightness."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    images = [np.clip(rng.normal(60 * y + 40, 20, (12, 12)), 0, 255).astype(np.uint8) for y in labels]
    return gray_shard(tmp_path_factory.mktemp("uge") / "data", images, labels)


def fit(src: str, **options):
    kwargs = {"authorized_seed": 7, "rounds": 2, "train_steps": 2, "pgd_steps": 2, "batch_size": 16, "device": "cpu",
              "progress": False}
    return fit_uge(src, **{**kwargs, **options})


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small-cnn", 4, 1, 8)


def test_gradient_matching_is_zero_for_clean_data_and_grows_with_the_perturbation():
    model, x, y = tiny(), torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    assert gradient_matching_loss(model, x, x, y).item() == pytest.approx(0, abs=1e-5)
    small = gradient_matching_loss(model, x, (x + 0.01 * torch.randn_like(x)).clamp(0, 1), y)
    large = gradient_matching_loss(model, x, (x + 0.5 * torch.randn_like(x)).clamp(0, 1), y)
    assert 0 < small.item() < large.item() <= 2


def test_gradient_matching_is_differentiable_with_respect_to_the_perturbation():
    model, x, y = tiny(), torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    d = (0.1 * torch.randn_like(x)).requires_grad_(True)
    (grad,) = torch.autograd.grad(gradient_matching_loss(model, x, x + d, y), d)
    assert grad.abs().sum() > 0


def test_feature_distance_is_minus_the_cosine_distance_of_features():
    encoder = torch.nn.Flatten()
    x = torch.rand(4, 1, 8, 8)
    assert float(feature_distance_loss(encoder, x, x)) == pytest.approx(0, abs=1e-6)
    assert float(feature_distance_loss(encoder, x, 1 - x)) < 0
    assert float(feature_distance_loss(encoder, x, -x)) == pytest.approx(-2, abs=1e-5)


def test_misalignment_pulls_towards_the_next_class_center():
    encoder = torch.nn.Flatten()
    x = torch.rand(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1])
    centers = torch.nn.functional.normalize(torch.stack([x[1].flatten(), x[0].flatten()]), dim=1)
    assert misalignment_loss(encoder, x[[0, 1, 0, 1]], y, centers).item() == pytest.approx(0, abs=1e-6)
    assert misalignment_loss(encoder, x, y, centers).item() > 0


def test_a_next_class_fit_records_its_feature_target(data):
    p = fit(data, feature_target="next-class")
    assert p.params["feature_target"] == "next-class" and len(p.params["history"]["fd"]) == 2
    with pytest.raises(UEDatasetsError, match="feature_target"):
        fit(data, feature_target="sideways")


def test_undistillation_is_minus_the_distillation_loss():
    t, s = torch.randn(5, 4), torch.randn(5, 4)
    assert float(undistillation_loss(t, t, 4.0)) == pytest.approx(0, abs=1e-6)
    assert float(undistillation_loss(t, s, 4.0)) < 0
    assert torch.allclose(distillation_loss(t, s, 4.0), -undistillation_loss(t, s, 4.0))


def test_the_gradient_matching_term_decreases_during_the_fit(data):
    history = fit(data, rounds=4, lambda_fd=0.0, lambda_ud=0.0, eps="32/255").params["history"]["gm"]
    assert history[-1] < history[0]


def test_the_bound_holds_after_quantisation(data):
    p = fit(data, eps="6/255")
    assert float(p.tensors["deltas"].abs().max()) <= 6 / 255 + 1e-7
    x = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    out = protect_batch(p, x, labels=[0, 1, 2, 3])
    assert int((out.int() - x.int()).abs().max()) <= 6


def test_the_fit_is_deterministic_with_a_seed(data):
    a, b = fit(data), fit(data)
    assert torch.equal(a.tensors["deltas"], b.tensors["deltas"]) and a.params["history"] == b.params["history"]
    assert not torch.equal(a.tensors["deltas"], fit(data, seed=1).tensors["deltas"])


def test_the_authorized_network_is_rebuilt_the_same_in_another_process(data, tmp_path):
    p = fit(data)
    p.save(tmp_path / "p")
    here = authorized_model(tmp_path / "p").state_dict()
    code = ("import sys; from ue_datasets import authorized_model; from safetensors.torch import save_file; "
            "state = authorized_model(sys.argv[1]).state_dict(); "
            "save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p"), str(tmp_path / "w.safetensors")], check=True)
    from safetensors.torch import load_file

    there = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(here[k], there[k]) for k in here)
    other = authorized_model(fit(data, authorized_seed=8))
    assert not torch.equal(other.state_dict()["fc.weight"], here["fc.weight"])
    model = authorized_model(p)
    assert model.training and model(torch.rand(2, 1, 12, 12)).shape == (2, 4)


def test_the_artifact_keeps_the_seed_secret_and_names_the_architecture(data):
    p = fit(data)
    assert p.params["authorized"] == {"arch": "small-cnn", "num_classes": 4, "in_channels": 1, "image_size": 12}
    assert "authorized_seed" not in p.params and int(p.tensors["authorized_seed"][0]) == 7
    with pytest.raises(UEDatasetsError, match="authorized_seed"):  # refused before the fit, not after it
        fit(data, authorized_seed=2**64 - 1)
    with pytest.raises(UEDatasetsError, match="not a UGE"):
        from ue_datasets import fit_convolution

        authorized_model(fit_convolution(4, 1))


def test_a_killed_fit_resumes_to_the_same_noise(data, tmp_path, monkeypatch):
    from ue_datasets.fit import uge

    whole = fit(data, rounds=3)
    real, calls = uge.undistillation_loss, []

    def dies_in_the_second_round(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # two noise steps per round
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(uge, "undistillation_loss", dies_in_the_second_round)
    with pytest.raises(KeyboardInterrupt):
        fit(data, rounds=3, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(uge, "undistillation_loss", real)
    resumed = fit(data, rounds=3, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(resumed.tensors["deltas"], whole.tensors["deltas"])
    assert resumed.params["history"] == whole.params["history"]
    with pytest.raises(UEDatasetsError, match="other settings"):
        fit(data, rounds=3, lr=0.01, cache_dir=str(tmp_path / "cache"))
