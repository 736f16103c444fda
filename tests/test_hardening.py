"""Untrusted input stays data: restricted decoders, no silent bit-depth loss, no lost samples, no self-overwrite."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib

import pytest

from conftest import make_samples, read_tar, write_shard
from ue_datasets import UEDatasetsError
from ue_datasets.apply.encoded import shared_pool
from ue_datasets.apply.images import ImageFormatError, decode
from ue_datasets.apply.shards import ShardOptions
from ue_datasets.apply.wds import protect_shards


def _png16_rgb(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x12\x34" * 3 * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_postscript_bytes_are_not_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
    with pytest.raises(ImageFormatError, match="cannot decode"):
        decode(eps)


def test_sixteen_bit_rgb_png_is_refused_not_reduced():
    with pytest.raises(ImageFormatError, match="16-bit"):
        decode(_png16_rgb())


def test_tar_member_without_extension_is_ignored_and_costs_no_sample(tmp_path, protection):
    samples = make_samples(3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, s in enumerate(samples):
            for ext in ("jpg", "cls"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tar.addfile(info, io.BytesIO(s[ext]))
            if i == 0:
                info = tarfile.TarInfo("README")
                info.size = 5
                tar.addfile(info, io.BytesIO(b"hello"))
    (tmp_path / "in.tar").write_bytes(buf.getvalue())
    (stats,) = protect_shards(protection, [str(tmp_path / "in.tar")], str(tmp_path / "out"),
                              ShardOptions(device="cpu"), progress=False)
    assert stats["written"] == 3 and stats["skipped"] == []
    assert [s["__key__"] for s in read_tar(tmp_path / "out" / "in.tar")] == [s["__key__"] for s in samples]


def test_output_folder_equal_to_input_folder_is_refused(tmp_path, protection):
    shard = write_shard(tmp_path / "a.tar", make_samples(2))
    before = (tmp_path / "a.tar").read_bytes()
    with pytest.raises(UEDatasetsError, match="would overwrite it"):
        protect_shards(protection, [shard], str(tmp_path), ShardOptions(device="cpu"), progress=False)
    assert (tmp_path / "a.tar").read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_codec_pool_works_in_a_forked_child():
    assert shared_pool().submit(lambda: 1).result(timeout=5) == 1
    pid = os.fork()
    if pid == 0:  # child: the parent's pool threads are gone; a new pool must be made
        try:
            ok = shared_pool().submit(lambda: 2).result(timeout=5) == 2
        except Exception:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_datasets_map_names_the_row_of_an_undecodable_image_and_can_skip_it(protection):
    import datasets

    from conftest import encode, make_dataset
    from ue_datasets import SampleError
    from ue_datasets.apply.hf import protect_dataset

    images, labels = make_dataset(3)
    rows = [{"bytes": encode(im), "path": None} for im in images]
    rows[1] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)
    with pytest.raises(SampleError, match="sample '1': cannot decode"):
        protect_dataset(ds, protection, device="cpu")
    skipped: list = []
    out = protect_dataset(ds, protection, device="cpu", on_error="skip", skipped=skipped)
    assert len(out) == 2 and [s["key"] for s in skipped] == ["1"]
    assert isinstance(out.features["image"], datasets.Image) and out.features["image"].decode
