"""The embedded default job: protect a small real sample shipped in the package, show before and after.

The sample is 300 Fashion-MNIST test images (30 per class, MIT licence) in one webdataset shard,
``ue_datasets/data/fashion-mnist-demo.tar``. The demo fits CUDA with a fixed, public key, rewrites the
shard, and draws a grid of clean and protected images.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .apply.images import decode, pil_to_tensor
from .apply.shards import ShardOptions
from .apply.wds import protect_shards, read_samples
from .errors import SampleError
from .fit import fit_convolution

DEMO_SHARD = "fashion-mnist-demo.tar"


def demo_shard() -> Path:
    """Path of the embedded demo shard."""
    return Path(str(resources.files("ue_datasets") / "data" / DEMO_SHARD))


def _by_class(path: Path, per_class: int) -> dict[int, list[torch.Tensor]]:
    picked: dict[int, list[torch.Tensor]] = {}
    with open(path, "rb") as f:
        for sample in read_samples(f, str(path)):
            if isinstance(sample, SampleError):
                raise sample
            c = int(sample["cls"])
            if len(picked.setdefault(c, [])) < per_class:
                picked[c].append(pil_to_tensor(decode(sample["png"])))
    return picked


def before_after_grid(clean: Path, protected: Path, out: Path, per_class: int = 2, scale: int = 4) -> Path:
    """A PNG grid, one column per class: pairs of rows, clean above, protected below."""
    a, b = _by_class(clean, per_class), _by_class(protected, per_class)
    classes = sorted(a)
    h, w = a[classes[0]][0].shape[-2:]
    cell, pad, left = h * scale, 4, 90
    rows = 2 * per_class
    grid = Image.new("RGB", (left + len(classes) * (cell + pad), rows * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        source, label = (a, "clean") if r % 2 == 0 else (b, "protected")
        y = pad + r * (cell + pad)
        draw.text((6, y + cell // 2 - 6), label, fill="black")
        for j, c in enumerate(classes):
            t = source[c][r // 2]
            tile = Image.fromarray(t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy())
            grid.paste(tile.resize((cell, cell), Image.NEAREST).convert("RGB"), (left + j * (cell + pad), y))
    grid.save(out)
    return out


def run_demo(output: str | Path = "ue-datasets-demo", key: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fit CUDA on the 10 Fashion-MNIST classes, protect the embedded shard, draw the grid.

    Returns:
        Paths of the protection, the protected shard, its stats and the grid, and the shard stats.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    protection = fit_convolution(num_classes=10, key=key)
    protection_dir = protection.save(out / "protection", overwrite=True)
    shard = demo_shard()
    stats = protect_shards(
        protection, [str(shard)], str(out / "shards"), ShardOptions(device="cpu"), overwrite=True, progress=progress
    )[0]
    protected = out / "shards" / stats["output"]
    grid = before_after_grid(shard, protected, out / "before_after.png")
    return {
        "protection": protection_dir,
        "shard": protected,
        "stats": protected.with_name(protected.stem + "_stats.json"),
        "grid": grid,
        "shard_stats": stats,
    }
