"""T2UE through every adapter: each sample's text (its caption, or the prompt of its label's class name)
reaches the tensor core, so the transform, ProtectedDataset, ProtectBatch, datasets.map, the webdataset
stage, the shard and parquet rewriters, the CLI and verify give the same pixels, in both modes; a sample
whose text cannot be found fails naming its file and key, or is skipped alone."""

from __future__ import annotations

import io
import json
import math

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import mixed_inputs, png_pixels, protect_cli, read_tar, tiny_t2ue, to_chw, write_shard
from PIL import Image
from ue_datasets.transforms import Protect, ProtectBatch, ProtectedDataset

from ue_datasets.apply.core import needs_texts, protect_batch
from ue_datasets.apply.hf import protect_dataset
from ue_datasets.apply.protect import protect
from ue_datasets.apply.texts import TextSource
from ue_datasets.apply.verify import verify
from ue_datasets.apply.wds import protect_stage
from ue_datasets.artifact import load_protection
from ue_datasets.errors import SampleError, UEDatasetsError

pytestmark = pytest.mark.usefixtures("offline_hub")

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PNGS, LABELS = mixed_inputs()
KEYS = [str(i) for i in range(len(PNGS))]  # the row index: the key datasets.map and parquet use too
CAPTIONS = [f"a photo of thing number {i % 5}" for i in range(len(PNGS))]  # repeats: same text, other keys
#: Indices of the same-size RGB images (8 x 8), which ProtectBatch takes as one stack.
SAME_SIZE = [0, 3, 6, 9]


@pytest.fixture(autouse=True)
def no_noise_cache(monkeypatch):
    """Every adapter computes its own noise (no deltas reused from the reference's call), so that the
    agreement tests see batching, chunk positions and padding, not a shared cache."""
    from ue_datasets.apply import generators

    monkeypatch.setattr(generators, "CACHE_BYTES", 0)
    generators._DELTAS.clear()
    generators._CACHED[0] = 0


@pytest.fixture(scope="module", params=["class", "sample"])
def t2ue(request, tmp_path_factory):
    """``(mode, protection loaded from its artifact, artifact directory)``."""
    folder = tmp_path_factory.mktemp(f"t2ue-{request.param}")
    protection, _ = tiny_t2ue(folder, request.param)
    path = str(protection.save(folder / "prot"))
    return request.param, load_protection(path), path


def _pixels() -> list[torch.Tensor]:
    return [png_pixels(b) for b in PNGS]


def _prompts(protection, template: str | None = None) -> list[str]:
    """The class-name prompt of every sample, as every adapter must make it."""
    if protection.params["lookup"] == "text" and template is None:
        return [f"a photo of a {NAMES[y]}." for y in LABELS]  # the class-wise prompt: the first template
    return TextSource(None, NAMES, template).texts(protection, None, LABELS, KEYS)


def _expected(protection, texts: list[str]) -> list[torch.Tensor]:
    return protect_batch(protection, _pixels(), keys=KEYS, texts=texts)


def _shard(folder, captions: bool = True, labels: bool = True, drop_caption: int | None = None,
           label_of: dict[int, bytes] | None = None) -> str:
    """One shard ``folder/s-000.tar`` of the inputs keyed by row index, with ``txt`` captions and ``cls``."""
    folder.mkdir(exist_ok=True)
    samples = []
    for i, (b, y, c) in enumerate(zip(PNGS, LABELS, CAPTIONS)):
        s = {"__key__": KEYS[i], "png": b}
        if captions and i != drop_caption:
            s["txt"] = c.encode()
        if labels:
            s["cls"] = (label_of or {}).get(i, str(y).encode())
        samples.append(s)
    return write_shard(folder / "s-000.tar", samples)


def _parquet(folder, captions: list | None = None) -> str:
    folder.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in PNGS], "label": LABELS,
                             "caption": CAPTIONS if captions is None else captions}), folder / "a.parquet")
    return str(folder / "a.parquet")


def _dataset(label_names: tuple[str, ...] | None = None) -> datasets.Dataset:
    label = datasets.ClassLabel(names=list(label_names)) if label_names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label, "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in PNGS], "label": LABELS,
                                       "caption": CAPTIONS}, features=features)


def _assert_same(expected: list[torch.Tensor], got: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"{what}: image {i} differs"


def test_a_text_protection_needs_one_text_per_image(t2ue):
    _, protection, _ = t2ue
    assert needs_texts(protection)
    with pytest.raises(UEDatasetsError, match=r"by its text: pass one text per image \(no texts for 12\)"):
        protect_batch(protection, _pixels(), keys=KEYS)
    with pytest.raises(UEDatasetsError, match=r"\(3 texts for 12\)"):
        protect_batch(protection, _pixels(), keys=KEYS, texts=CAPTIONS[:3])
    with pytest.raises(UEDatasetsError, match=r"give texts_getter=\.\.\. \(captions\) or class_names="):
        Protect(protection, keys_getter=lambda s: s[2])(Image.open(io.BytesIO(PNGS[0])), LABELS[0], KEYS[0])


def test_every_adapter_gives_identical_pixels_with_captions(t2ue, tmp_path):
    _, protection, _ = t2ue
    expected = _expected(protection, CAPTIONS)
    images = [Image.open(io.BytesIO(b)) for b in PNGS]

    transform = Protect(protection, keys_getter=lambda s: s[2], texts_getter=lambda s: s[1])
    _assert_same(expected, [to_chw(transform(im, c, k)[0]) for im, c, k in zip(images, CAPTIONS, KEYS)], "transform")

    dataset = ProtectedDataset(list(zip(images, CAPTIONS)), protection, texts_getter=lambda s: s[1])
    _assert_same(expected, [to_chw(dataset[i][0]) for i in range(len(dataset))], "ProtectedDataset")
    fetched = dataset.__getitems__(list(range(len(dataset))))
    _assert_same(expected, [to_chw(im) for im, _ in fetched], "ProtectedDataset batch")
    assert [c for _, c in fetched] == CAPTIONS

    batch = ProtectBatch(protection, texts_getter=lambda s: s[1])
    out, captions = batch.collate([(png_pixels(PNGS[i]), CAPTIONS[i], KEYS[i]) for i in SAME_SIZE])
    _assert_same([expected[i] for i in SAME_SIZE], list(out), "ProtectBatch.collate")
    assert list(captions) == [CAPTIONS[i] for i in SAME_SIZE]

    mapped = protect_dataset(_dataset(), protection, text_column="caption", batch_size=5)
    _assert_same(expected, [to_chw(im) for im in mapped["image"]], "datasets.map")

    shard = _shard(tmp_path / "in")  # captions in txt: the default caption field of shards
    stage = protect_stage(protection, batch_size=3)
    _assert_same(expected, [png_pixels(s["png"]) for s in wds.WebDataset(shard, shardshuffle=False).compose(stage)],
                 "webdataset stage")

    result = protect(tmp_path / "in", tmp_path / "out", protection, batch_size=5, device="cpu", progress=False)
    assert (result.samples, result.protected) == (12, 12)
    written = read_tar(tmp_path / "out" / "s-000.tar")
    _assert_same(expected, [png_pixels(s["png"]) for s in written], "shard rewriter")
    assert [s["txt"] for s in written] == [c.encode() for c in CAPTIONS]  # the caption is kept byte for byte

    protect(_parquet(tmp_path / "pq"), tmp_path / "pq-out", protection, text_field="caption", batch_size=4,
            device="cpu", progress=False)
    table = pq.read_table(tmp_path / "pq-out" / "a.parquet")
    _assert_same(expected, [png_pixels(r["bytes"]) for r in table["image"].to_pylist()], "parquet rewriter")

    assert verify(protection, str(tmp_path / "out"), str(tmp_path / "in")).protected == 12
    report = verify(protection, str(tmp_path / "pq-out"), str(tmp_path / "pq"), text_field="caption")
    assert report.ok and report.protected == 12, report.summary()


def test_every_adapter_gives_identical_pixels_with_class_names_and_labels(t2ue, tmp_path):
    _, protection, path = t2ue
    expected = _expected(protection, _prompts(protection))
    images = [Image.open(io.BytesIO(b)) for b in PNGS]

    transform = Protect(protection, keys_getter=lambda s: s[2], class_names=NAMES)
    _assert_same(expected, [to_chw(transform(im, y, k)[0]) for im, y, k in zip(images, LABELS, KEYS)], "transform")

    dataset = ProtectedDataset(list(zip(images, LABELS)), protection, class_names=NAMES)
    _assert_same(expected, [to_chw(dataset[i][0]) for i in range(len(dataset))], "ProtectedDataset")
    _assert_same(expected, [to_chw(im) for im, _ in dataset.__getitems__(list(range(len(dataset))))],
                 "ProtectedDataset batch")

    stack = torch.stack([png_pixels(PNGS[i]) for i in SAME_SIZE])
    out, labels = ProtectBatch(protection, class_names=NAMES)(stack, torch.tensor([LABELS[i] for i in SAME_SIZE]),
                                                              [KEYS[i] for i in SAME_SIZE])
    _assert_same([expected[i] for i in SAME_SIZE], list(out), "ProtectBatch")

    mapped = protect_dataset(_dataset(NAMES), protection, batch_size=5)  # the ClassLabel's names
    _assert_same(expected, [to_chw(im) for im in mapped["image"]], "datasets.map")

    shard = _shard(tmp_path / "in")  # class names given: the labels' prompts, not the txt captions
    stage = protect_stage(protection, batch_size=3, class_names=NAMES)
    _assert_same(expected, [png_pixels(s["png"]) for s in wds.WebDataset(shard, shardshuffle=False).compose(stage)],
                 "webdataset stage")

    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    assert protect_cli("--protection", path, "--input", shard, "--output", str(tmp_path / "out"),
                       "--class-names", str(tmp_path / "names.txt"), "--batch-size", "5") == 0
    _assert_same(expected, [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")],
                 "shard rewriter (CLI)")

    protect(_parquet(tmp_path / "pq"), tmp_path / "pq-out", protection, class_names=NAMES, batch_size=4,
            device="cpu", progress=False)
    table = pq.read_table(tmp_path / "pq-out" / "a.parquet")
    _assert_same(expected, [png_pixels(r["bytes"]) for r in table["image"].to_pylist()], "parquet rewriter")

    _dataset(NAMES).save_to_disk(str(tmp_path / "hf"))  # a save_to_disk directory: the ClassLabel's names
    protect(tmp_path / "hf", tmp_path / "hf-out", protection, batch_size=5, device="cpu", progress=False)
    _assert_same(expected, [to_chw(im) for im in datasets.load_from_disk(str(tmp_path / "hf-out"))["image"]],
                 "dataset rewriter")

    for report in (verify(protection, str(tmp_path / "out"), shard, class_names=NAMES),
                   verify(protection, str(tmp_path / "hf-out"), str(tmp_path / "hf"))):
        assert report.ok and report.protected == 12, report.summary()
    assert not verify(protection, str(tmp_path / "out"), shard).ok  # the txt captions give other noise


BAD = {
    "missing caption": ("wds", "missing caption field 'txt'"),
    "null caption": ("parquet", "missing caption field 'caption'"),
    "label without class name": ("wds-names", "label 12 has no class name (10 names given)"),
}


def _bad_source(kind: str, folder) -> tuple[str, dict]:
    """A source whose sample 2 has no text, and the options that protect it."""
    where = BAD[kind][0]
    if where == "parquet":
        captions = list(CAPTIONS)
        captions[2] = None
        return _parquet(folder, captions), {"text_field": "caption"}
    if where == "wds-names":
        return _shard(folder, captions=False, label_of={2: b"12"}), {"class_names": NAMES}
    return _shard(folder, drop_caption=2), {}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_sample_without_its_text_fails_naming_its_file_and_key(t2ue, tmp_path, kind):
    _, protection, _ = t2ue
    src, options = _bad_source(kind, tmp_path / "in")
    with pytest.raises(SampleError) as info:
        protect(src, tmp_path / "out", protection, device="cpu", progress=False, **options)
    assert info.value.source == src and info.value.key == "2"
    assert BAD[kind][1] in info.value.reason and src in str(info.value)


@pytest.mark.parametrize("kind", list(BAD))
def test_a_sample_without_its_text_is_skipped_alone_and_recorded(t2ue, tmp_path, kind):
    _, protection, _ = t2ue
    src, options = _bad_source(kind, tmp_path / "in")
    result = protect(src, tmp_path / "out", protection, on_error="skip", max_skipped=1, device="cpu",
                     progress=False, **options)
    assert [(s["key"], BAD[kind][1] in s["reason"]) for s in result.skipped] == [("2", True)]
    assert (result.samples, result.written) == (12, 11)
    texts = _prompts(protection) if "class_names" in options else CAPTIONS
    expected = [x for i, x in enumerate(_expected(protection, texts)) if i != 2]
    if BAD[kind][0] == "parquet":
        got = [png_pixels(r["bytes"]) for r in pq.read_table(tmp_path / "out" / "a.parquet")["image"].to_pylist()]
    else:
        got = [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")]
    _assert_same(expected, got, "the other samples")


def test_cli_protect_takes_a_caption_field_and_class_names_with_a_template(t2ue, tmp_path, capsys):
    _, protection, path = t2ue
    folder = tmp_path / "in"
    folder.mkdir()
    samples = [{"__key__": k, "png": b, "caption": c.encode()} for k, b, c in zip(KEYS, PNGS, CAPTIONS)]
    shard = write_shard(folder / "s-000.tar", samples)
    assert protect_cli("--protection", path, "--input", shard, "--output", str(tmp_path / "out"),
                       "--caption-field", "caption") == 0
    _assert_same(_expected(protection, CAPTIONS),
                 [png_pixels(s["png"]) for s in read_tar(tmp_path / "out" / "s-000.tar")], "--caption-field")
    stats = json.loads((tmp_path / "out" / "s-000_stats.json").read_text())
    assert stats["settings"]["text_field"] == "caption"

    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    template = "a blurry photo of a {name}."
    assert protect_cli("--protection", path, "--input", _shard(tmp_path / "labelled", captions=False), "--output",
                       str(tmp_path / "out-names"), "--class-names", str(tmp_path / "names.txt"),
                       "--template", template) == 0
    _assert_same(_expected(protection, [template.format(name=NAMES[y]) for y in LABELS]),
                 [png_pixels(s["png"]) for s in read_tar(tmp_path / "out-names" / "s-000.tar")], "--class-names")

    capsys.readouterr()
    assert protect_cli("--protection", path, "--input", shard, "--output", str(tmp_path / "out-bad"),
                       "--class-names", str(tmp_path / "names.txt"), "--template", "a photo") == 2
    err = capsys.readouterr().err
    assert "template 'a photo' has no {name} placeholder" in err and "a photo of a {name}." in err
    assert not (tmp_path / "out-bad").exists()


def test_noise_differs_between_texts_and_in_sample_mode_between_keys(t2ue):
    mode, protection, _ = t2ue
    x = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    by_text = protect_batch(protection, x, keys=["k", "k"], texts=["a photo of a cat.", "a photo of a dog."])
    assert not torch.equal(by_text[0], by_text[1])
    by_key = protect_batch(protection, x, keys=["k1", "k2"], texts=["a photo of a cat."] * 2)
    assert torch.equal(by_key[0], by_key[1]) == (mode == "class")
    assert torch.equal(by_key[0], by_text[0]) == (mode == "class")


def test_the_linf_bound_holds_after_quantisation(t2ue, tmp_path):
    _, protection, _ = t2ue
    bound = math.floor(255 * protection.params["eps"] + 0.5)
    clean = _pixels()
    for texts in (CAPTIONS, _prompts(protection)):
        for x, y in zip(clean, protect_batch(protection, clean, keys=KEYS, texts=texts)):
            diff = (x.int() - y.int()).abs()
            assert 0 < int(diff.max()) <= bound
    protect(_shard(tmp_path / "in"), tmp_path / "out", protection, device="cpu", progress=False)
    for x, s in zip(clean, read_tar(tmp_path / "out" / "s-000.tar")):
        assert int((x.int() - png_pixels(s["png"]).int()).abs().max()) <= bound
