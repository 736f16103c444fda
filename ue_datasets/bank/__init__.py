"""A noise bank: the per-sample noise of sample-wise methods (error-minimizing noise, SALM), on disk.

One noise tensor per training sample does not fit in memory for millions of images, so it lives in a
*bank*: a directory of safetensors shard files of bounded size plus an index, opened memory-mapped (an
open reads the manifest and the index's header, never the shards or the index's data, so it costs the
same for ten thousand entries as for ten million), and looked up by the sample's key, checked against
a checksum of the sample's pixels (`ue_datasets.kernels.samples.pixel_checksum`): a key that names
another image (a row index of another split or file) never gets someone else's noise.

An entry is int8 grey levels ``d`` of shape ``(C, H, W)`` (C = 1..3) at the image's own resolution,
the noise already quantised: the protected image is ``clamp(x + d, 0, 255)`` for the uint8 image x
(`ue_datasets.kernels.noise.add_delta` with integer levels). Entries of one bank may differ in shape.

Format (version `BANK_FORMAT_VERSION`), a directory holding:

* ``deltas-00000.safetensors``, ``deltas-00001.safetensors``, ...: each one 1-D int8 tensor
  ``levels``, its entries' levels concatenated (each entry C-order). A shard file is at most
  ``shard_bytes`` bytes, unless it holds a single entry larger than that. (The writer streams entries
  into a shard and writes its header last, in a space for it reserved at the start of the file: the
  header is JSON padded with spaces, as the safetensors format allows.)
* ``index.safetensors`` (written with ``safetensors.torch.save_file``), N = number of entries, one
  row per entry; a row number is what `Bank.find` returns and `Bank.levels` takes:

  - ``hashes`` int64 ``(N,)``: `key_hashes` of the entry's key (the unsigned 64-bit value read as
    signed int64), sorted ascending; entries of one key in the order they were added;
  - ``shard`` int32 ``(N,)``: the shard number (``deltas-<shard>``);
  - ``offset`` int64 ``(N,)``: offset of the entry's first element in that shard's ``levels``;
  - ``shape`` int32 ``(N, 3)``: ``(C, H, W)``;
  - ``checksum`` int64 ``(N, 2)``: `pixel_checksum` of the image the entry was computed for.

* ``manifest.json``, written last and atomically (an incomplete bank has none and cannot be opened):

    {"format": "ue-datasets-bank", "format_version": 1, "entries": N, "dtype": "int8",
     "shard_bytes": B, "index": {"file": "index.safetensors", "sha256": "<hex>", "bytes": n},
     "shards": [{"file": "deltas-00000.safetensors", "entries": n0, "bytes": b0, "sha256": "<hex>"}, ...]}

  `Bank.digest` is ``sha256:<hex>`` of the manifest's canonical JSON, which covers every file's
  sha256: two banks with the same digest hold the same bytes. `Bank.verify` re-hashes the files (O(size)).

Reading: `Bank.open` parses each safetensors header itself (8-byte little-endian header length, then
the JSON header giving each tensor's dtype, shape and ``data_offsets`` from the end of the header),
maps the file read-only with ``numpy.memmap`` and takes each tensor as a view at
``8 + header length + begin``; nothing is read until used. Shards are mapped on first use. `Bank.find`
hashes a batch of keys, finds each key's run of rows with ``numpy.searchsorted`` (left and right) on
the mapped ``hashes``, and compares the candidates' checksums with the samples', vectorised per batch.

A key may have several entries (row indices repeat across parquet files): the one whose checksum
matches the sample's pixels is found. Two entries with the same key and the same checksum are refused
when the bank is closed. Keys themselves are not stored, only their 64-bit hashes; two different keys
with the same hash would also need equal pixel checksums to be confused.

The shards hold the protection's secret noise: a bank is to be kept like a protection artifact.

Modules: `format` (the names and constants of the format, the manifest read, checked and written,
safetensors headers parsed and files memory-mapped), `writer` (`BankWriter`), `reader` (`Bank`).
"""

from .format import (
    BANK_FORMAT,
    BANK_FORMAT_VERSION,
    DEFAULT_SHARD_BYTES,
    INDEX,
    INDEX_TENSORS,
    MANIFEST,
    SHARD_HEADER_BYTES,
    SHARD_NAME,
    SHARD_OVERHEAD,
    read_bank_manifest,
)
from .reader import Bank
from .writer import BankWriter

__all__ = ["BANK_FORMAT", "BANK_FORMAT_VERSION", "DEFAULT_SHARD_BYTES", "INDEX", "INDEX_TENSORS", "MANIFEST",
           "SHARD_HEADER_BYTES", "SHARD_NAME", "SHARD_OVERHEAD", "Bank", "BankWriter", "read_bank_manifest"]
