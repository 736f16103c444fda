"""The protection artifact: what `fit` produces and `apply` consumes.

On disk a protection is a directory with two files, loaded without pickle:

* ``tensors.safetensors``: the secret material (filters, noise, centers...), float32/uint8 tensors.
* ``manifest.json``: format name and version, package version, method, its public parameters,
  the name, dtype and shape of each tensor, and a sha256 digest over method, parameters and tensors.

and, for sample-wise noise methods, a ``bank/`` directory: the per-sample noise in sharded safetensors
files (`ue_datasets.bank`), memory-mapped on load; its digest is one of the parameters.

The artifact is the protector's secret: whoever holds it can regenerate the protection. What travels
with protected data (shards, stats files, dataset fingerprints) names it only by its ``id``, a random
128-bit identifier drawn at fit time. Never the digest: the digest is a function of the key, so a
published digest would let anyone test guesses of the key offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError
from .version import ARTIFACT_FORMAT, __version__

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
BANK = "bank"
FORMAT_NAME = "ue-datasets-protection"


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True, eq=False)
class Protection:
    """A fitted protection: method name, public parameters and secret tensors.

    Args:
        method: registered method name, e.g. ``"convolution"`` (the CUDA paper's method).
        params: JSON-serialisable public parameters (no key, no secret).
        tensors: the secret tensors, on any device; saved as contiguous CPU tensors.
        id: random public identifier (32 hex digits), the only name of the protection that outputs
            carry; drawn anew for every fit.
        bank: the noise bank of a sample-wise protection (`ue_datasets.bank.Bank`, memory-mapped,
            saved as ``bank/`` beside the tensors); ``params["bank"]`` records its digest, so the
            protection's digest covers it.
    """

    method: str
    params: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    bank: Any = field(default=None, repr=False)

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` over method, parameters and every tensor's name, dtype, shape and bytes."""
        h = hashlib.sha256()
        h.update(_canonical_json({"method": self.method, "params": self.params}).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().to("cpu").contiguous()
            h.update(_canonical_json([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "sha256:" + h.hexdigest()

    def public(self) -> dict[str, str]:
        """What may travel with protected data: the method and the random id (never the digest)."""
        return {"method": self.method, "id": self.id}

    def manifest(self) -> dict[str, Any]:
        """The public manifest: everything but the tensors' values."""
        return {
            "format": FORMAT_NAME,
            "format_version": ARTIFACT_FORMAT,
            "ue_datasets_version": __version__,
            "id": self.id,
            "method": self.method,
            "params": self.params,
            "tensors": {
                n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                for n, t in sorted(self.tensors.items())
            },
            "digest": self.digest,
        }

    def to(self, device: torch.device | str) -> Protection:
        """The protection with its tensors on ``device`` (same digest); copies are cached per device."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors.values()):
            return self
        cache = self.__dict__.setdefault("_device_copies", {})
        if device not in cache:
            cache[device] = Protection(self.method, self.params, {n: t.to(device) for n, t in self.tensors.items()},
                                       self.id, self.bank)
        return cache[device]

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "tensors": self.tensors, "id": self.id, "bank": self.bank}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the artifact to ``directory`` atomically (a temporary sibling, then a rename)."""
        from safetensors.torch import save_file

        out = Path(directory)
        if "bank" in self.params and self.bank is None:
            raise ArtifactError("this protection's parameters name a noise bank but none is attached; load it "
                                "with load_protection, or attach the bank the fit returned")
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise ArtifactError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
            others = sorted(p.name for p in out.iterdir() if p.name not in (TENSORS, MANIFEST, BANK))
            if others or not (out / MANIFEST).is_file():
                raise ArtifactError(f"{out}: is not a protection artifact ({', '.join(others) or 'no manifest'}); "
                                    "nothing in it is replaced: choose another directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            save_file({n: t.detach().to("cpu").contiguous() for n, t in self.tensors.items()}, tmp / TENSORS)
            if self.bank is not None:
                self.bank.copy_to(tmp / BANK)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2, sort_keys=True) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check an artifact's manifest without loading its tensors."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if not Path(directory).exists():
            raise ArtifactError(f"{directory}: no such artifact directory") from None
        raise ArtifactError(f"{directory}: not a protection artifact (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path}: not a ue-datasets protection manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path}: manifest has no integer format_version")
    if version > ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path}: artifact format {version} is newer than this ue-datasets {__version__} reads "
            f"(format {ARTIFACT_FORMAT}); upgrade ue-datasets"
        )
    for key in ("id", "method", "params", "tensors", "digest"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    return manifest


def load_protection(directory: str | os.PathLike, device: torch.device | str = "cpu") -> Protection:
    """Load an artifact saved with `Protection.save`, verifying its digest.

    Raises:
        ArtifactError: missing files, a truncated tensor file, tensors that differ from the manifest,
            a digest mismatch (tampering), or a format newer than this version reads.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(directory)
    path = Path(directory) / TENSORS
    try:
        tensors = load_file(path, device="cpu")
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: missing {TENSORS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable or truncated tensor file ({e})") from None
    protection = Protection(manifest["method"], manifest["params"], tensors, str(manifest["id"]),
                            _open_bank(Path(directory), manifest["params"]))
    declared = manifest["tensors"]
    actual = protection.manifest()["tensors"]
    if declared != actual:
        raise ArtifactError(f"{path}: tensors do not match the manifest (expected {declared}, found {actual})")
    if protection.digest != manifest["digest"]:
        raise ArtifactError(
            f"{directory}: digest mismatch: the manifest says {manifest['digest']}, the content hashes to "
            f"{protection.digest}; the artifact was modified or corrupted"
        )
    return protection.to(device) if torch.device(device).type != "cpu" else protection


def _open_bank(directory: Path, params: dict[str, Any]) -> Any:
    """The artifact's noise bank, opened memory-mapped (in time independent of its size), or None."""
    if "bank" not in params:
        return None
    from .bank import Bank

    bank = Bank.open(directory / BANK)
    if bank.digest != params["bank"].get("digest"):
        raise ArtifactError(
            f"{directory / BANK}: digest mismatch: the manifest says {params['bank'].get('digest')}, the bank's "
            f"manifest hashes to {bank.digest}; the bank was modified or belongs to another protection"
        )
    return bank


def as_protection(protection: Protection | str | os.PathLike) -> Protection:
    """``protection`` itself, or the artifact saved in that directory (`load_protection`)."""
    return protection if isinstance(protection, Protection) else load_protection(protection)
