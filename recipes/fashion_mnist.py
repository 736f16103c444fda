"""Load real Fashion-MNIST from its IDX files (Debian package ``dataset-fashion-mnist``, or a folder).

``apt-get install dataset-fashion-mnist`` puts the four ``*-idx?-ubyte.gz`` files in
``/usr/share/datasets/fashion-mnist``; pass another folder with the same files as ``root``.
Fashion-MNIST is (c) 2017 Zalando SE, MIT licence.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ue_datasets.apply.wds import write_samples

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train", root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 28, 28)`` and labels uint8 ``(N,)`` of ``split`` (``train`` or ``test``)."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    for suffix in (".gz", ""):
        images = root / f"{prefix}-images-idx3-ubyte{suffix}"
        if images.exists():
            return _idx(images), _idx(root / f"{prefix}-labels-idx1-ubyte{suffix}")
    raise FileNotFoundError(
        f"no Fashion-MNIST IDX files in {root}: `apt-get install dataset-fashion-mnist`, or pass the folder"
    )


def write_image_shards(images: Sequence[Image.Image], labels: Sequence[int], keys: Sequence[str], folder: Path,
                     name: str, per_shard: int, png_level: int = 1, texts: Sequence[str] | None = None,
                     jpeg_quality: int | None = None) -> list[str]:
    """Write webdataset shards of ``KEY.png`` + ``KEY.cls`` (+ ``KEY.txt`` captions when ``texts``) into
    ``folder``; ``name`` formats the shard number (``"train-{:03d}.tar"``). With ``jpeg_quality``, the
    images are ``KEY.jpg`` at that quality (PIL's defaults otherwise: 4:2:0), as cameras and scrapers
    leave them. Returns the shard paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for n, start in enumerate(range(0, len(images), per_shard)):
        samples = []
        for i in range(start, min(start + per_shard, len(images))):
            buf = io.BytesIO()
            if jpeg_quality is None:
                images[i].save(buf, format="PNG", compress_level=png_level)
            else:
                images[i].save(buf, format="JPEG", quality=jpeg_quality)
            field = "png" if jpeg_quality is None else "jpg"
            samples.append({"__key__": keys[i], field: buf.getvalue(), "cls": str(int(labels[i])).encode()})
            if texts is not None:
                samples[-1]["txt"] = texts[i].encode()
        path = folder / name.format(n)
        with open(path, "wb") as f:
            write_samples(f, samples)
        urls.append(str(path))
    return urls


def balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` indices of every class, in dataset order."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))


def write_shards(images: np.ndarray, labels: np.ndarray, index: np.ndarray, folder: Path, prefix: str,
                 per_shard: int = 2000, caption: Callable[[int, str], str] | None = None) -> list[str]:
    """Shards ``PREFIX-000.tar``... of the images at ``index``, keyed ``PREFIX-<dataset index>``; with
    ``caption(label, key) -> str``, each sample also gets a ``txt`` caption."""
    keys = [f"{prefix}-{i:05d}" for i in index]
    texts = None if caption is None else [caption(int(labels[i]), k) for i, k in zip(index, keys)]
    return write_image_shards([Image.fromarray(images[i], "L") for i in index], labels[index], keys, folder,
                            prefix + "-{:03d}.tar", per_shard, texts=texts)
