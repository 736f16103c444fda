"""Fit SALM (Sparsity-Aware Local Masking): Sun, Liu, Yan, Xu, Sun, "Medical Unlearnable Examples:
Securing Medical Data from Unauthorized Training via Sparsity-Aware Local Masking", arXiv 2403.10573 (2024).

**A reconstruction.** The paper has no public code; only its abstract is verified (``methods.md`` §4):
SALM "selectively perturbs significant pixel regions rather than the entire image". How the regions are
chosen, how many pixels, whether they are recomputed, eps and the schedule are not known; here they are
options, and the defaults are our choice:

* sample-wise error-minimising noise (`ue_datasets.fit.em`: the same rounds, surrogate, checkpoints and
  noise bank) where each image i has a binary mask ``M_i`` of its top ``k = floor(mask_ratio * H * W)`` (at least 1)
  pixels, the same on every channel, and its noise is ``M_i * delta_i``: the PGD step is multiplied by
  the mask, so unmasked pixels keep zero noise;
* ``mask_criterion``: ``"gradient"`` (default): saliency ``sum_c |dCE/dx_c|`` of the clean image under
  the current surrogate (eval mode); ``"intensity"``: ``sum_c x_c``, the bright foreground of a
  dark-background medical image; ``"random"``: uniform scores seeded by the fit's seed and the sample's
  key (and the round, when refreshed each round);
* ``mask_refresh``: ``"once"`` (default): computed in the first round, after the fresh surrogate's first
  SGD steps, kept in the cache (a uint8 memmap, for resume) and reused; ``"round"``: recomputed at the
  start of every round's PGD pass, the noise outside the new mask set to zero (nothing to keep: the
  state then holds the masked noise);
* ties in the scores go to the lower pixel index (a stable sort), so masks are deterministic.

What SALM sees of medical images: the decoder (`ue_datasets.apply.images`) reads 8-bit images only;
16-bit PNG, TIFF and PGM (and I;16, I, F modes) are refused with an error asking for an explicit
conversion to 8 bits, never silently reduced. So masks and noise are computed on the 8-bit L (or RGB)
pixels the core protects, and the intensity criterion ranks those 8-bit values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..artifact import Protection
from ..errors import UEDatasetsError
from .em import run_fit
from .pgd import frozen
from .store import derive_seed

CRITERIA = ("gradient", "intensity", "random")
REFRESH = ("once", "round")


def mask_size(mask_ratio: float, height: int, width: int) -> int:
    """Pixels a mask keeps: ``floor(mask_ratio * height * width)``, at least 1, so that at most a share
    ``mask_ratio`` of an image's pixels change (one pixel for a ratio below one pixel's share)."""
    return max(1, math.floor(mask_ratio * height * width + 1e-9))


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Float ``(B, 1, H, W)``: 1 at the ``k`` highest of ``scores`` float ``(B, H, W)`` per image, else 0;
    equal scores go to the lower flat index."""
    b, h, w = scores.shape
    order = torch.sort(scores.reshape(b, -1), dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros(b, h * w, device=scores.device).scatter_(1, order, 1.0)
    return mask.reshape(b, 1, h, w)


class SaliencyMask:
    """The `ue_datasets.fit.em.MaskProvider` of SALM (module docstring).

    Args:
        mask_ratio: fraction of each image's pixels kept, in (0, 1].
        criterion: one of `CRITERIA`.
        refresh: one of `REFRESH`.
        seed: the fit's seed (``"random"`` masks).
    """

    def __init__(self, mask_ratio: float, criterion: str, refresh: str, seed: int):
        self.mask_ratio, self.criterion, self.refresh, self.seed = mask_ratio, criterion, refresh, seed

    def scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[str],
               round_index: int) -> torch.Tensor:
        """Float ``(B, H, W)``: how significant each pixel of ``x`` float ``(B, C, H, W)`` in [0, 1] is."""
        if self.criterion == "intensity":
            return x.sum(1)
        if self.criterion == "random":
            r = round_index if self.refresh == "round" else 0
            h, w = x.shape[-2:]
            return torch.stack([torch.rand(h, w, generator=torch.Generator().manual_seed(derive_seed(self.seed, k, r)))
                                for k in keys]).to(x.device)
        with frozen(model):
            x = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
        return grad.abs().sum(1)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[str],
                 round_index: int) -> torch.Tensor:
        """Float ``(B, 1, H, W)`` of 0 and 1, ``mask_size`` ones per image."""
        h, w = x.shape[-2:]
        return top_mask(self.scores(model, x, y, keys, round_index), mask_size(self.mask_ratio, h, w))


def fit_salm(src: str, *, mask_ratio: float = 0.1, mask_criterion: str = "gradient", mask_refresh: str = "once",
             **options: Any) -> Protection:
    """Fit SALM noise on the labelled images of ``src``: sample-wise EM restricted to masks (module docstring).

    Args:
        src: shards, a ``save_to_disk`` directory or parquet files.
        mask_ratio: fraction of each image's pixels that may carry noise, in (0, 1].
        mask_criterion: ``"gradient"``, ``"intensity"`` or ``"random"``.
        mask_refresh: ``"once"`` or ``"round"``.
        **options: those of `ue_datasets.fit.em.fit_em` (``eps``, ``pgd_steps``, ``max_rounds``,
            ``cache_dir``, ``bank_dir``...), except ``mode`` (always sample-wise), ``subset`` and ``resolution``.

    Returns:
        ``Protection("salm", params, {})`` with ``params["lookup"] == "key"`` and the noise bank as its
        ``bank`` attribute, as a sample-wise `fit_em`; ``params`` also hold ``mask_ratio``,
        ``mask_criterion`` and ``mask_refresh``. Each entry is nonzero on at most
        ``floor(mask_ratio * H * W)`` (at least 1) pixel positions.
    """
    for name in ("mode", "subset", "resolution"):
        if name in options:
            raise UEDatasetsError(f"fit_salm takes no {name!r}: SALM noise is sample-wise and image-sized")
    if not 0 < mask_ratio <= 1:
        raise UEDatasetsError(f"mask_ratio must be in (0, 1], got {mask_ratio!r}")
    if mask_criterion not in CRITERIA:
        raise UEDatasetsError(f"mask_criterion must be one of {CRITERIA}, got {mask_criterion!r}")
    if mask_refresh not in REFRESH:
        raise UEDatasetsError(f"mask_refresh must be one of {REFRESH}, got {mask_refresh!r}")
    seed = options.get("seed", 0)
    extra = {"mask_ratio": mask_ratio, "mask_criterion": mask_criterion, "mask_refresh": mask_refresh}
    return run_fit("salm", src, mode="samplewise", masker=SaliencyMask(mask_ratio, mask_criterion, mask_refresh, seed),
                   extra=extra, **options)
