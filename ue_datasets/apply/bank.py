"""The ``key`` lookup: each sample takes its own noise from the protection's noise bank.

Sample-wise methods (EM sample-wise, SALM) store one delta per fitted sample, quantised to int8 grey
levels at the sample's own resolution, in a memory-mapped bank (`ue_datasets.bank`). A sample finds
its entry by its key, checked against a checksum of its pixels (`ue_datasets.kernels.samples`), so a
key that names another image (row indices of another split) never takes someone else's noise. A
sample the bank does not hold is not covered: the core names it, or lets it through unprotected
(``unfitted="pass"``, counted by the adapters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..artifact import Protection
from ..errors import UEDatasetsError
from ..kernels.samples import pixel_checksum
from .noise import register_lookup


def bank_of(protection: Protection):
    """The noise bank attached to ``protection`` (`ue_datasets.bank.Bank`)."""
    bank = getattr(protection, "bank", None)
    if bank is None:
        raise UEDatasetsError(
            f"this {protection.method!r} protection finds noise in a noise bank, and none is attached: load the "
            "artifact with ue_datasets.load_protection(directory), which opens its bank/"
        )
    return bank


def _rows(protection: Protection, x: torch.Tensor, keys: Sequence[str] | None) -> torch.Tensor:
    if keys is None:
        return torch.full((x.shape[0],), -1, dtype=torch.int64)
    bank = bank_of(protection)
    rows = bank.find([str(k) for k in keys], pixel_checksum(x).cpu())
    shape = tuple(x.shape[1:])  # equal bytes in another shape have the same checksum: not the same image
    return torch.tensor([r if r < 0 or bank.shape(r) == shape else -1 for r in rows.tolist()], dtype=torch.int64)


def _covers(protection: Protection, x: torch.Tensor, keys: Sequence[str] | None) -> torch.Tensor:
    return _rows(protection, x, keys) >= 0


@register_lookup("key", needs={"keys"}, covers=_covers)
def delta_by_key(protection: Protection, x: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """int8 grey levels ``(B, C, H, W)``: each sample's bank entry (every sample must be covered)."""
    rows = _rows(protection, x, keys)
    if bool((rows < 0).any()):
        missing = [keys[i] for i in (rows < 0).nonzero().squeeze(1).tolist()]
        raise UEDatasetsError(f"no noise in the bank for the samples with keys {missing[:5]}")
    return torch.stack(bank_of(protection).levels(rows)).to(x.device)
