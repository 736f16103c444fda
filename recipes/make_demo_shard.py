"""Rebuild the demo shard shipped in the package: 300 real Fashion-MNIST test images, 30 per class.

    python recipes/make_demo_shard.py [--root /usr/share/datasets/fashion-mnist]

Writes ``ue_datasets/data/fashion-mnist-demo.tar`` (webdataset: ``KEY.png``, ``KEY.cls``, ``KEY.json``)
reproducibly (the first 30 test images of each class, tar mtime 0).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fashion_mnist import CLASSES, DEFAULT_ROOT, load
from ue_datasets.apply.wds import write_samples

OUT = Path(__file__).resolve().parent.parent / "ue_datasets" / "data" / "fashion-mnist-demo.tar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=DEFAULT_ROOT, help="folder of the Fashion-MNIST IDX files")
    ap.add_argument("--per-class", type=int, default=30)
    args = ap.parse_args()
    images, labels = load("test", args.root)
    picks = sorted(int(i) for c in range(10) for i in np.flatnonzero(labels == c)[: args.per_class])
    samples = []
    for i in picks:
        buf = io.BytesIO()
        Image.fromarray(images[i], "L").save(buf, format="PNG", compress_level=9)
        meta = {"source": "Fashion-MNIST t10k", "index": i, "class": CLASSES[labels[i]]}
        samples.append({"__key__": f"fmnist-t10k-{i:05d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})
    with open(OUT, "wb") as f:
        write_samples(f, samples)
    print(f"wrote {len(samples)} samples to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
