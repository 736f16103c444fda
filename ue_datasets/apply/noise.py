"""The additive-noise path: one kernel (`ue_datasets.kernels.noise.add_delta`), pluggable lookups.

Every noise method protects an image the same way, ``x~ = quantise(clamp(x / 255 + delta, 0, 1))``;
what differs is how a sample finds its ``delta``. A method is its fit, its lookup and its parameters:

===========  ======================  =========================================================
lookup       condition               the delta of a sample
===========  ======================  =========================================================
class        its label (needed)      ``deltas[label]`` (EM class-wise, UGE)
cluster      its key (used if given) its fitted cluster's, else the nearest center's (Unlearnable Clusters)
key          its key (needed)        its own, from the protection's noise bank (EM sample-wise, SALM)
text         its text (needed)       ``G(e(text), z0)`` from the artifact's generator (T2UE class-wise)
text-sample  its text and its key    ``G(e(text), z(key))`` (T2UE sample-wise)
===========  ======================  =========================================================

The ``class`` and ``cluster`` lookups also feed CUDA's convolution kernel: a protection with
``params["kernel"] == "filter"`` holds a table ``filters`` (N, k, k) instead of ``deltas``, and each image is filtered with
the row its lookup finds (`ue_datasets.apply.convolution.apply_filters`; Unlearnable Clusters'
``filters`` mode). `table_of` names the table a protection's lookup reads.

A lookup is registered with `register_lookup` where it is defined (``apply/clusters.py``,
``apply/bank.py``, ``apply/generators.py``) and chosen by the protection's ``params["lookup"]`` (or its
method's default).
It returns float32 ``(B, Cd, R, R)`` in [-eps, eps] at a reference resolution (resized nearest), or
integer grey levels ``(B, C, H, W)`` already quantised (banks). A lookup that holds deltas for some
samples only also says which (``covers``), so the core can name or pass the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..artifact import Protection
from ..errors import UEDatasetsError
from ..kernels.noise import add_delta

#: Methods whose samples find their rows by a lookup (the additive-noise path, or filters for a
#: ``kernel: filter`` protection), and the lookup of artifacts that name none.
NOISE_METHODS: dict[str, str] = {"clusters": "cluster", "em": "class", "salm": "key", "t2ue": "text", "uge": "class"}
#: What a lookup's rows are fed to (``params["kernel"]``): added as noise, or convolved as filters.
KERNELS = ("noise", "filter")
#: The lookups whose rows can be filters (they index a table; a bank holds noise levels only).
FILTER_LOOKUPS = ("class", "cluster")


@dataclass(frozen=True)
class Lookup:
    """How samples of a protection find their delta.

    Attributes:
        name: the ``params["lookup"]`` value.
        fn: ``fn(protection, x uint8 (B, C, H, W), **conditions) -> delta`` (see the module docstring).
        needs: conditions it cannot do without (``"labels"``, ``"keys"``).
        uses: conditions it uses when given.
        label_range: the parameter bounding labels (``num_classes``), when it takes labels.
        covers: ``covers(protection, x, keys) -> bool (B,)``: which samples it holds a delta for;
            ``None`` when it has one for every sample.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()
    label_range: str | None = None
    covers: Callable[..., torch.Tensor] | None = None


LOOKUPS: dict[str, Lookup] = {}


def register_lookup(name: str, *, needs: Iterable[str] = (), uses: Iterable[str] = (), label_range: str | None = None,
                    covers: Callable[..., torch.Tensor] | None = None) -> Callable:
    """Decorator registering a lookup function under ``name``; a second one for a name is refused."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in LOOKUPS:
            raise ValueError(f"lookup {name!r} already has a function registered ({LOOKUPS[name].fn.__qualname__})")
        LOOKUPS[name] = Lookup(name, fn, frozenset(needs), frozenset(uses), label_range, covers)
        return fn

    return register


def lookup_of(protection: Protection) -> Lookup:
    """The lookup ``protection`` uses: ``params["lookup"]``, else its method's default."""
    name = protection.params.get("lookup", NOISE_METHODS.get(protection.method))
    try:
        return LOOKUPS[name]
    except KeyError:
        raise UEDatasetsError(
            f"protection {protection.method!r} asks for lookup {name!r}; this ue-datasets has {sorted(LOOKUPS)}"
        ) from None


def kernel_of(protection: Protection) -> str:
    """The kernel a lookup protection's rows feed (one of `KERNELS`; default ``noise``)."""
    kernel = protection.params.get("kernel", "noise")
    if kernel not in KERNELS:
        raise UEDatasetsError(
            f"protection {protection.method!r} asks for kernel {kernel!r}; this ue-datasets has {KERNELS}"
        )
    if kernel == "filter":
        lookup = lookup_of(protection).name
        missing = [k for k in ("grayscale", "quantize") if k not in protection.params]
        if lookup not in FILTER_LOOKUPS or "filters" not in protection.tensors or missing:
            raise UEDatasetsError(
                f"protection {protection.method!r} asks for the filter kernel, which needs one of the lookups "
                f"{FILTER_LOOKUPS} (it has {lookup!r}), a 'filters' tensor and the grayscale/quantize parameters"
            )
    return kernel


def table_of(protection: Protection) -> str:
    """The tensor whose rows the lookup picks: ``filters`` for the filter kernel, else ``deltas``."""
    return "filters" if kernel_of(protection) == "filter" else "deltas"


def look_up(protection: Protection, x: torch.Tensor, **conditions: object) -> torch.Tensor:
    """The rows of each sample (delta or filter) found by the protection's lookup, on ``x``'s device.

    Only the conditions the lookup needs or uses are passed on.
    """
    lookup = lookup_of(protection)
    given = {k: v for k, v in conditions.items() if k in lookup.needs | lookup.uses}
    return lookup.fn(protection, x, **given).to(x.device)


def apply_noise(protection: Protection, x: torch.Tensor, **conditions: object) -> torch.Tensor:
    """Kernel of every noise method: uint8 ``(B, C, H, W)`` in, the same out (C = 1 or 3).

    ``params["legacy_clamp"]`` reproduces the EM reference's apply (its bug 1): float deltas lose
    their negative values (clamped at 0) and the sum is truncated (``rounding: truncate``).
    """
    delta = look_up(protection, x, **conditions)
    if protection.params.get("legacy_clamp") and delta.is_floating_point():
        delta = delta.clamp(min=0)
    return add_delta(x, delta, protection.params.get("rounding", "half-up"))


@register_lookup("class", needs={"labels"}, label_range="num_classes")
def delta_by_class(protection: Protection, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``deltas[label]``: float32 ``(B, Cd, R, R)`` from ``deltas`` ``(num_classes, Cd, R, R)`` (or
    ``filters[label]``, ``(B, k, k)``, for the filter kernel)."""
    table = protection.tensors[table_of(protection)]
    return table[labels.to(table.device)]
