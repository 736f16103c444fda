"""Every example in the README and in docstrings runs as written.

The README's ``bash`` blocks run through the CLI in this process (``pip`` and ``python recipes/...``
lines aside) and its ``python`` blocks run in order in one namespace, in a folder that holds what the
README says the examples start from: tiny webdataset shards, a ``save_to_disk`` dataset, parquet files
and Fashion-MNIST IDX files. Stand-ins, because no weights ship and CI has two CPU cores: the OpenAI
RN50 weights the clusters example names are a tiny open_clip bundle built here, that fit makes 2
clusters in one fast pass, and the audit trains for 1 epoch. Docstring examples (``>>>``) run with
doctest in a folder of their own that starts the same.
"""

from __future__ import annotations

import doctest
import glob
import importlib
import io
import pkgutil
import re
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ue_datasets

from conftest import save_clip_bundle, tiny_clip, write_shard

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


#: Fashion-MNIST's class names, for the T2UE examples' ``names.txt`` and captions.
NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The commands of a bash block, as written: continuation lines joined, comments and ``&&`` chains split."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        for part in re.sub(r"(^|\s)#.*$", "", line).split("&&"):
            if part.strip():
                commands.append(" ".join(part.split()))
    return commands


def _words(command: str) -> list[str]:
    """``command`` split as bash splits it: quotes removed, unquoted globs expanded (kept when they match
    nothing)."""
    words = []
    for word in shlex.split(command, posix=False):
        if word[0] in "'\"" and word[-1] == word[0]:
            words.append(word[1:-1])
        elif any(ch in word for ch in "*?["):
            words.extend(sorted(glob.glob(word)) or [word])
        else:
            words.append(word)
    return words


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def _tiny_bundle(folder: Path) -> str:
    """A randomly initialised tiny open_clip model saved as a ``local-dir:`` bundle."""
    model = tiny_clip(folder / "cfg", "ue-readme-tiny", TINY_CLIP)
    return f"local-dir:{save_clip_bundle(model, TINY_CLIP, folder / 'bundle')}"


def _start_folder(root: Path) -> Path:
    """Fill ``root`` with what the README's examples start from (see its Quickstart)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 28, 28), dtype=np.uint8)
    labels = np.arange(32) % 10
    for n in range(4):
        write_shard(str(root / "shards" / f"train-{n:06d}.tar"),
                    [{"__key__": f"train-{i:05d}", "png": _png(images[i]), "cls": str(labels[i]).encode()}
                     for i in range(5 * n, 5 * n + 5)])
    write_shard(str(root / "captioned_shards" / "pairs-000000.tar"),
                [{"__key__": f"pair-{i:05d}", "png": _png(images[i]), "cls": str(labels[i]).encode(),
                  "txt": f"a photo of a {NAMES[labels[i]]}.".encode()} for i in range(12)])
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    write_shard(str(root / "test_shards" / "test-000000.tar"),
                [{"__key__": f"test-{i:05d}", "png": _png(images[i]), "cls": str(labels[i]).encode()}
                 for i in range(20, 32)])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(a), "path": None} for a in images[:8]], "label": labels[:8].tolist()},
        features=features).save_to_disk(str(root / "my_dataset_dir"))
    (root / "data").mkdir()
    for n in range(2):
        rows = range(4 * n, 4 * n + 4)
        pq.write_table(pa.table({"image": [{"bytes": _png(images[i]), "path": None} for i in rows],
                                 "label": [int(labels[i]) for i in rows]}), str(root / "data" / f"part-{n}.parquet"))
    raw = root / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, part in (("train", slice(0, 24)), ("t10k", slice(24, 32))):
        _idx(raw / f"{split}-images-idx3-ubyte", images[part])
        _idx(raw / f"{split}-labels-idx1-ubyte", labels[part])
    return root


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """The README's starting folder, and the stand-ins its commands run with."""
    root = _start_folder(tmp_path_factory.mktemp("readme"))
    bundle = _tiny_bundle(root / "models")
    stand_ins = {"open_clip:RN50-quickgelu:/models/rn50-openai.pt": bundle, "local-dir:/models/my-clip": bundle,
                 "--epochs 50": "--epochs 1 --batch-size 8",
                 "--rounds 12": "--rounds 1 --train-steps 1 --pgd-steps 1 --batch-size 8 --device cpu",
                 "--clusters 10": "--clusters 2 --mode fast --epochs 1", "--epochs 10": "--epochs 1",
                 "--max-rounds 10": "--max-rounds 1 --pgd-steps 2 --device cpu"}
    return root, stand_ins


@pytest.fixture(scope="module")
def doctest_dir(tmp_path_factory):
    """The same starting folder, for the docstring examples (which write outputs of their own)."""
    return _start_folder(tmp_path_factory.mktemp("doctests"))


def _run_cli(command: str, stand_ins: dict[str, str]) -> None:
    from ue_datasets.cli import main

    for readme, stand_in in stand_ins.items():
        command = command.replace(readme, stand_in)
    code = main(_words(command)[1:])
    assert code == 0, f"`{command}` exited with {code}"


def test_every_readme_example_runs_as_written(readme_dir, monkeypatch):
    root, stand_ins = readme_dir
    monkeypatch.chdir(root)
    monkeypatch.setenv("UE_DATASETS_PROGRESS_SECONDS", "3600")
    text = README.read_text()
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for block in re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M):
        language, body = block
        if language == "python":
            exec(compile(body, "README.md", "exec"), namespace)
            ran += 1
            continue
        for command in _commands(body):
            if command.startswith("ue-datasets"):
                _run_cli(command, stand_ins)
                ran += 1
    assert ran >= 10


def test_the_readme_opens_with_the_install_and_test_commands():
    first = _commands(_blocks(README.read_text(), "bash")[0])
    assert first == ["pip install .", "ue-datasets demo", 'pip install -e ".[test]"', "python -m pytest"]


def _modules() -> list[str]:
    names = [ue_datasets.__name__, "ue_datasets.transforms"]
    names += [m.name for m in pkgutil.walk_packages(ue_datasets.__path__, "ue_datasets.")]
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module("ue_datasets.transforms").__path__,
                                                    "ue_datasets.transforms.")]
    return sorted(set(names))


def test_docstring_examples_are_doctests():
    """A code example in a docstring is written as ``>>>`` lines (not a ``::`` literal block), so that the
    next test runs it."""
    literal = []
    for name in _modules():
        for test in doctest.DocTestFinder(recurse=True).find(importlib.import_module(name)):
            if test.docstring and re.search(r"::\n\s*\n\s+\S", test.docstring):  # a literal (code) block
                literal.append(test.name)
    assert not literal


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name, doctest_dir, monkeypatch):
    monkeypatch.chdir(doctest_dir)
    monkeypatch.setenv("UE_DATASETS_PROGRESS_SECONDS", "3600")
    module = importlib.import_module(name)
    failures = []
    for test in doctest.DocTestFinder(recurse=True).find(module):
        if not test.examples or test.name.split(".")[-1].startswith("_") and test.name != module.__name__:
            continue
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=out.write)
        if runner.failures:
            failures.append(out.getvalue())
    assert not failures, "\n".join(failures)


def test_examples_leave_no_lock_or_partial_file_behind(readme_dir, doctest_dir):
    for root in (readme_dir[0], doctest_dir):
        assert not [p for p in root.rglob("*") if p.name.endswith(".lock") or ".partial-" in p.name]
