"""Shared fixtures: tiny synthetic images, webdataset shards and a fitted protection.

Everything here is small (a handful of images of at most 16x16 pixels) so that the whole suite runs
in seconds on a couple of CPU cores, offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One OpenMP thread, set before torch starts: with two, torch's threads spin-wait between the many
# small operations of these tiny tests, and on cores that other work keeps busy the slowest files take
# 3.7x longer (215 s against 57 s beside two busy processes); on idle cores two threads save 10 %.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from ue_datasets import fit_convolution  # noqa: E402
from ue_datasets.apply.wds import write_samples  # noqa: E402

#: (height, width) of the synthetic images, cycled through.
SIZES = [(8, 8), (12, 10), (16, 16)]
NUM_CLASSES = 10
#: EXIF orientation 6: the stored pixels must be rotated 90 degrees clockwise for display.
EXIF_ROTATE_270 = 6


def random_arrays(n: int, seed: int = 0, sizes=SIZES, channels: int = 3) -> list[np.ndarray]:
    """``n`` random uint8 images ``(H, W, C)`` (or ``(H, W)`` for one channel) of cycling sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        shape = (h, w) if channels == 1 else (h, w, channels)
        out.append(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return out


def make_dataset(n: int, seed: int = 0, num_classes: int = NUM_CLASSES, sizes=SIZES):
    """``n`` random RGB PIL images of a few sizes and their labels (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed + 1000)
    images = [Image.fromarray(a, "RGB") for a in random_arrays(n, seed, sizes)]
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return images, labels


def encode(img: Image.Image, fmt: str = "PNG", exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kwargs["quality"] = 90
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def to_chw(img: Image.Image) -> torch.Tensor:
    """uint8 ``(C, H, W)`` of a PIL image, computed independently of the package."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_display(data: bytes) -> Image.Image:
    """Decode encoded bytes as they display: EXIF orientation applied."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return ImageOps.exif_transpose(img)


def png_pixels(data: bytes) -> torch.Tensor:
    """uint8 ``(C, H, W)`` of PNG bytes."""
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return to_chw(img)


def make_samples(n: int, seed: int = 0, prefix: str = "s", fmt: str = "jpg", exif_index: int | None = 1):
    """Raw webdataset samples ``{"__key__", jpg|png, "cls", "json", "txt"}`` with random images.

    The sample at ``exif_index`` (if any, and if ``fmt == "jpg"``) carries an EXIF orientation tag.
    """
    images, labels = make_dataset(n, seed)
    samples = []
    for i, (img, label) in enumerate(zip(images, labels)):
        key = f"{prefix}{seed:03d}_{i:05d}"
        if fmt == "jpg":
            data = encode(img, "JPEG", EXIF_ROTATE_270 if i == exif_index else None)
        else:
            data = encode(img, "PNG")
        samples.append({
            "__key__": key,
            fmt: data,
            "cls": str(label).encode(),
            "json": json.dumps({"index": i, "seed": seed, "caption": f"picture {i}"}).encode(),
            "txt": f"a random picture, number {i}\n".encode(),
        })
    return samples


def write_shard(url: str, samples) -> str:
    """Write ``samples`` as a tar shard at ``url`` (a path or an fsspec URL) with the package's writer."""
    with fsspec.open(str(url), "wb") as f:
        write_samples(f, samples)
    return str(url)


def restat_shard(shard: Path, samples) -> None:
    """Rewrite ``shard`` with ``samples`` and its stats with the new size and sha256, so that only the
    samples themselves tell the change."""
    write_shard(str(shard), samples)
    data = shard.read_bytes()
    stats_file = shard.with_name(shard.stem + "_stats.json")
    stats = json.loads(stats_file.read_text())
    stats.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    stats_file.write_text(json.dumps(stats))


def read_tar(url: str) -> list[dict]:
    """The samples of a tar shard, grouped by key, in order, with a list of member names in order."""
    import tarfile

    with fsspec.open(str(url), "rb") as f:
        data = f.read()
    samples: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            base = m.name
            key, ext = base.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="session")
def protection():
    """CUDA (convolution) protection, 10 classes, key 0: the paper's defaults."""
    return fit_convolution(NUM_CLASSES, key=0)


@pytest.fixture(scope="session")
def other_protection():
    """A different protection (another key) for mismatch tests."""
    return fit_convolution(NUM_CLASSES, key=1)


@pytest.fixture
def shards(tmp_path):
    """Three local shards of 5 jpg samples each (one sample per shard has an EXIF rotation)."""
    d = tmp_path / "in"
    d.mkdir()
    return [write_shard(str(d / f"shard-{i:02d}.tar"), make_samples(5, seed=i)) for i in range(3)]


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def protect_cli(*args: str) -> int:
    """``ue-datasets protect ARGS`` in this process, on the CPU, without progress bars; its exit status."""
    from ue_datasets.cli import main

    return main(["protect", *args, "--no-progress", "--device", "cpu"])


@pytest.fixture
def prot(tmp_path, protection):
    """The ``protection`` fixture saved as an artifact directory; its path."""
    return str(protection.save(tmp_path / "prot"))


@pytest.fixture
def dataset_dir(tmp_path):
    """A ``save_to_disk`` dataset of 6 images with labels, at ``tmp_path/data/ds``."""
    import datasets

    images, labels = make_dataset(6)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": encode(im), "path": None} for im in images],
                                     "label": labels}, features=features)
    ds.save_to_disk(str(tmp_path / "data" / "ds"))
    return tmp_path / "data" / "ds"


def mixed_inputs() -> tuple[list[bytes], list[int]]:
    """Mixed sizes and modes: RGB, L, RGBA; PNG-encoded so every adapter sees the same pixels."""
    rng = np.random.default_rng(7)
    images = []
    for i in range(12):
        h, w = [(8, 8), (10, 6), (16, 12)][i % 3]
        mode = ["RGB", "L", "RGBA"][i % 3 if i < 9 else 0]
        shape = {"RGB": (h, w, 3), "L": (h, w), "RGBA": (h, w, 4)}[mode]
        images.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode))
    labels = [int(v) for v in rng.integers(0, 10, 12)]
    return [encode(im) for im in images], labels


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hugging Face Hub and datasets offline for this test, whatever the environment says."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def tiny_clip(folder: Path, name: str, cfg: dict):
    """A seeded, randomly initialised open_clip model of ``cfg``, registered with open_clip as ``name``
    (its config written into ``folder``); in eval mode."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval()


def save_clip_bundle(model, cfg: dict, folder: Path) -> Path:
    """``model`` saved as an open_clip ``local-dir:`` bundle in ``folder`` (created): ``open_clip_config.json``
    with its preprocessing, and ``open_clip_model.safetensors``."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def template_task(seed: int, n: int, size: int = 8, classes: int = 4):
    """``n`` grayscale ``size`` x ``size`` uint8 images, each a fixed class template plus noise, and their
    labels (int64 numpy): a task a small CNN learns in an epoch."""
    templates = np.random.default_rng(99).integers(0, 256, (classes, size, size)).astype(np.float64)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = [np.clip(0.6 * templates[y] + rng.normal(60, 30, (size, size)), 0, 255).astype(np.uint8) for y in labels]
    return images, labels


def gray_shard(folder: Path, images, labels, prefix: str = "k") -> str:
    """One shard ``folder/part-000.tar`` (folder created) of grayscale uint8 ``(H, W)`` arrays as PNGs with
    their ``cls``, keyed ``PREFIX0000``, ``PREFIX0001``..."""
    folder.mkdir(parents=True)
    samples = [{"__key__": f"{prefix}{i:04d}", "png": encode(Image.fromarray(im, "L")), "cls": str(int(y)).encode()}
               for i, (im, y) in enumerate(zip(images, labels))]
    return write_shard(folder / "part-000.tar", samples)


#: A tiny open_clip CLIP (16-d embeddings, 16 px images) for the T2UE tests.
TINY_T2UE_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_t2ue(folder: Path, mode: str = "class", seed: int = 0):
    """An untrained T2UE protection at 16 px over a seeded tiny CLIP saved as a ``local-dir:`` bundle in
    ``folder``; its text path is switched on (residual gains and text MLPs randomised, which training
    would do), so that different texts get different noise. Returns ``(protection, clip spec string)``."""
    from ue_datasets.encoders.text import load_text_encoder
    from ue_datasets.fit.t2ue import t2ue_protection
    from ue_datasets.fit.t2ue_generator import T2UEGenerator

    model = tiny_clip(folder / "cfg", "ue-tiny-t2ue", TINY_T2UE_CLIP)
    spec = f"local-dir:{save_clip_bundle(model, TINY_T2UE_CLIP, folder / 'clip')}"
    torch.manual_seed(seed)
    g = T2UEGenerator(16, nz=8, ngf=4, resolution=16)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("gamma_res") or ".gamma.2." in name or ".beta.2." in name:
                p.normal_(0, 1)
    g.eval()
    return t2ue_protection(g, load_text_encoder(spec).spec.to_json(), eps=8 / 255, mode=mode, z_seed=seed + 1), spec
