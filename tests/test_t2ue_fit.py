"""T2UE fit: training against a frozen CLIP, resuming, the artifact, and noise from text alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode, tiny_t2ue, write_shard
from PIL import Image

from ue_datasets.apply.generators import noise_file, noise_image, text_noise
from ue_datasets.artifact import Protection, load_protection
from ue_datasets.cli import main
from ue_datasets.errors import SampleError, UEDatasetsError
from ue_datasets.fit import t2ue as t2ue_fit
from ue_datasets.fit.t2ue import fit_t2ue, multi_positive_infonce, with_mode

pytestmark = pytest.mark.usefixtures("offline_hub")

NAMES = ("cat", "dog", "car", "ship")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(protection, CLIP spec, folder of one captioned shard of 24 gray 12x12 images)."""
    root = tmp_path_factory.mktemp("t2ue_fit")
    protection, spec = tiny_t2ue(root / "model")
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "png": encode(Image.fromarray(rng.integers(0, 255, (12, 12), np.uint8), "L")),
                "txt": f"a photo of a {NAMES[i % 4]}.".encode()} for i in range(24)]
    (root / "data").mkdir()
    write_shard(root / "data" / "part-000.tar", samples)
    return protection, spec, root / "data"


def fit(spec: str, data: Path, **options):
    kwargs = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "ngf": 4, "nz": 8, "device": "cpu", "progress": False}
    return fit_t2ue(str(data), clip=spec, **{**kwargs, **options})


def test_training_lowers_the_infonce_loss(tiny):
    _, spec, data = tiny
    losses = fit(spec, data, epochs=6, lr=1e-2).params["loss_history"]
    assert len(losses) == 6
    assert losses[-1] < losses[0]


def test_multi_positive_infonce_is_clip_loss_for_unique_captions():
    torch.manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(5, 8), dim=1) for _ in range(2))
    logits = 10 * a @ b.T
    y = torch.arange(5)
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, y) + torch.nn.functional.cross_entropy(logits.T, y))
    assert torch.allclose(multi_positive_infonce(a, b, list("abcde"), 10), clip, atol=1e-6)
    # repeated captions are all positives: swapping two images of one caption changes nothing
    texts = ["x", "x", "y", "z", "z"]
    swapped = a[[1, 0, 2, 3, 4]]
    assert torch.allclose(multi_positive_infonce(a, b, texts, 10), multi_positive_infonce(swapped, b, texts, 10),
                          atol=1e-6)


def test_a_killed_fit_resumes_to_the_same_generator(tiny, tmp_path, monkeypatch):
    _, spec, data = tiny
    whole = fit(spec, data, epochs=3)
    real = t2ue_fit.caption_batches
    calls = []

    def dies_in_the_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(t2ue_fit, "caption_batches", dies_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit(spec, data, epochs=3, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(t2ue_fit, "caption_batches", real)
    resumed = fit(spec, data, epochs=3, cache_dir=str(tmp_path / "cache"))
    assert resumed.params["loss_history"] == whole.params["loss_history"]
    for name, t in whole.tensors.items():
        assert torch.equal(t, resumed.tensors[name]), name
    with pytest.raises(UEDatasetsError, match="other settings"):
        fit(spec, data, epochs=3, lr=5e-4, cache_dir=str(tmp_path / "cache"))


def test_a_missing_caption_is_named_with_its_file_and_key(tiny, tmp_path):
    _, spec, _ = tiny
    samples = [{"__key__": "has", "png": encode(Image.new("L", (12, 12))), "txt": b"a photo of a cat."},
               {"__key__": "lacks", "png": encode(Image.new("L", (12, 12)))}]
    (tmp_path / "d").mkdir()
    shard = write_shard(tmp_path / "d" / "part-000.tar", samples)
    with pytest.raises(SampleError) as e:
        fit(spec, tmp_path / "d", epochs=1)
    assert "lacks" in str(e.value) and shard in str(e.value) and "'txt'" in str(e.value)


def test_the_artifact_holds_generator_clip_budget_and_seed(tiny, tmp_path):
    _, spec, data = tiny
    p = fit(spec, data, epochs=1, eps="4/255", resolution=8)
    p.save(tmp_path / "a")
    loaded = load_protection(tmp_path / "a")
    assert loaded.params["eps"] == pytest.approx(4 / 255) and loaded.params["resolution"] == 8
    assert loaded.params["clip"]["weights_digest"] and loaded.params["lookup"] == "text"
    assert "z_seed" in loaded.tensors and any(k.startswith("generator.") for k in loaded.tensors)
    assert torch.equal(text_noise(p, ["a photo of a cat."]), text_noise(loaded, ["a photo of a cat."]))


def test_init_with_no_epochs_rewraps_the_generator_in_the_other_mode(tiny):
    protection, spec, data = tiny
    sample = fit(spec, data, epochs=0, init=protection, mode="sample")
    assert sample.params["lookup"] == "text-sample" and sample.id != protection.id
    assert with_mode(protection, "sample").params["lookup"] == "text-sample"
    same = [k for k in protection.tensors if k.startswith("generator.")]
    assert all(torch.equal(protection.tensors[k], sample.tensors[k]) for k in same)


def test_noise_depends_on_the_text_and_in_sample_mode_on_the_key(tiny):
    protection, _, _ = tiny
    texts = ["a photo of a cat.", "a photo of a cat.", "a photo of a dog."]
    class_wise = text_noise(protection, texts, ["a", "b", "a"])
    assert torch.equal(class_wise[0], class_wise[1]) and not torch.equal(class_wise[0], class_wise[2])
    assert class_wise.abs().max() <= protection.params["eps"] + 1e-7
    sample_wise = with_mode(protection, "sample")
    d = text_noise(sample_wise, ["a photo of a cat."] * 2, ["a", "b"])
    assert not torch.equal(d[0], d[1])
    assert torch.equal(d[0], text_noise(sample_wise, ["a photo of a cat."], ["a"])[0])
    with pytest.raises(UEDatasetsError, match="key"):
        text_noise(sample_wise, ["a photo of a cat."])


def test_noise_of_a_text_does_not_depend_on_its_batch(tiny):
    protection, _, _ = tiny
    texts = [f"a photo of thing {i}." for i in range(40)]
    together = text_noise(protection.to("cpu"), texts)
    from ue_datasets.apply import generators

    generators._DELTAS.clear()
    alone = torch.cat([text_noise(protection, [t]) for t in reversed(texts)]).flip(0)
    assert torch.equal(together, alone)


def test_the_noise_command_gives_the_same_bytes_in_another_process(tiny, tmp_path):
    protection, _, _ = tiny
    protection.save(tmp_path / "p")
    noise_file(tmp_path / "p", "a photo of a sneaker.", tmp_path / "here.png", size=28)
    noise_file(tmp_path / "p", "a photo of a sneaker.", tmp_path / "here.safetensors")
    code = ("import sys; from ue_datasets.cli import main; sys.exit(main(['noise', '--protection', sys.argv[1], "
            "'--text', 'a photo of a sneaker.', '--size', '28', '-o', sys.argv[2]]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p"), str(tmp_path / "there.png")], check=True)
    assert (tmp_path / "here.png").read_bytes() == (tmp_path / "there.png").read_bytes()
    from safetensors.torch import load_file

    exact = load_file(tmp_path / "here.safetensors")["noise"]
    assert torch.equal(exact, text_noise(protection, ["a photo of a sneaker."])[0])
    assert np.asarray(Image.open(tmp_path / "here.png")).shape == (28, 28, 3)
    assert noise_image(torch.tensor([[[-protection.params["eps"], 0.0, protection.params["eps"]]]]),
                       protection.params["eps"]).tolist() == [[[0, 128, 255]]]


def test_the_noise_command_never_replaces_a_file_unasked(tiny, tmp_path, capsys):
    protection, _, _ = tiny
    protection.save(tmp_path / "p")
    (tmp_path / "mine.png").write_bytes(b"user data")
    assert main(["noise", "--protection", str(tmp_path / "p"), "--text", "x", "-o", str(tmp_path / "mine.png")]) == 2
    assert (tmp_path / "mine.png").read_bytes() == b"user data"
    assert "--overwrite" in capsys.readouterr().err


def test_fit_t2ue_command_writes_an_artifact(tiny, tmp_path, capsys):
    _, spec, data = tiny
    out = tmp_path / "t2ue"
    assert main(["fit", "t2ue", "--input", str(data), "--caption-field", "txt", "--clip", spec, "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu", "--no-progress", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fitted t2ue (class-wise)" in printed and "keep this directory secret" in printed
    assert load_protection(out).method == "t2ue"
    assert not (tmp_path / "t2ue.cache").exists()


def test_init_keeps_the_generators_budget_bound_and_seed_and_needs_its_clip(tiny, tmp_path):
    protection, spec, data = tiny
    rewrapped = fit(spec, data, epochs=0, init=protection, eps="2/255", bound="clamp", seed=5)
    assert rewrapped.params["eps"] == protection.params["eps"] and rewrapped.params["bound"] == "scale"
    assert torch.equal(rewrapped.tensors["z_seed"], protection.tensors["z_seed"])
    assert torch.equal(text_noise(rewrapped, ["a photo of a cat."]), text_noise(protection, ["a photo of a cat."]))
    elsewhere = Protection("t2ue", {**protection.params, "clip": {**protection.params["clip"],
                                                                   "weights_digest": "sha256:" + "0" * 64}},
                           protection.tensors)
    with pytest.raises(UEDatasetsError, match="another CLIP"):
        fit(spec, data, epochs=0, init=elsewhere)
    with pytest.raises(UEDatasetsError, match="trains nothing"):
        fit(spec, data, epochs=0)


def test_noise_ignores_autocast(tiny):
    protection, _, _ = tiny
    from ue_datasets.apply import generators

    generators._DELTAS.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = text_noise(protection, ["a photo of a dog."])
    generators._DELTAS.clear()
    assert torch.equal(under, text_noise(protection, ["a photo of a dog."]))


def test_the_noise_command_refuses_a_key_it_would_ignore_and_asks_for_one_it_needs(tiny, tmp_path):
    protection, _, _ = tiny
    with pytest.raises(UEDatasetsError, match="drop --key"):
        noise_file(protection, "x", tmp_path / "a.png", key="k1")
    with pytest.raises(UEDatasetsError, match="--key"):
        noise_file(with_mode(protection, "sample"), "x", tmp_path / "b.png")
