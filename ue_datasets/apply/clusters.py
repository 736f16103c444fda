"""Apply Unlearnable Clusters: the ``cluster`` lookup, each image takes its cluster's perturbation.

An image fitted with the protection keeps the cluster it was given at fit time: the artifact stores
each fitted sample's key, cluster and a checksum of its pixels, and a sample whose key and pixels both
match uses the stored cluster. Any other image (a new one, or one whose key names a different image,
as row indices of another split do) is embedded with the protection's surrogate encoder, loaded once
per process and device, and takes the nearest center. Fitted assignments are the nearest centers of
their features too, so both paths agree up to float rounding in the encoder.

The perturbation ``delta_k`` is added by the kernel every noise method shares
(`ue_datasets.kernels.noise.add_delta`): stored at a reference resolution R x R, it is resized to each image's
size with nearest-neighbour interpolation (``F.interpolate(mode="nearest")``, the reference code's
``resize_type: noise``), which keeps every value of delta and so the L-inf bound. A one-channel delta
is used on every colour channel; a three-channel delta on a grayscale image is averaged over its
channels. Then ``x~ = clamp(x / 255 + delta, 0, 1)`` is quantised rounding half up, as the
reference's ``save_image`` does: ``|x~ - x| <= floor(255 * eps + 0.5)`` grey levels.

A ``filters``-mode protection (``params["kernel"] == "filter"``) holds a CUDA filter per cluster instead;
the same lookup finds it and CUDA's kernel applies it (`ue_datasets.apply.convolution.apply_filters`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..artifact import Protection
from ..errors import UEDatasetsError
from ..kernels.nearest import nearest_center
from ..kernels.samples import decode_keys, pixel_checksum
from .noise import register_lookup, table_of

_ENCODERS: dict[tuple[str, str], Any] = {}
_TABLES: dict[str, dict[str, tuple[int, tuple[int, int]]]] = {}
_LOCK = threading.Lock()


def fitted_table(protection: Protection) -> dict[str, tuple[int, tuple[int, int]]]:
    """``key -> (cluster, pixel checksum)`` of the fitted samples, built once per protection."""
    with _LOCK:
        if protection.id not in _TABLES:
            t = protection.tensors
            keys = decode_keys(t["keys_utf8"], t["key_offsets"])
            clusters = t["assignments"].tolist()
            sums = [tuple(c) for c in t["checksums"].tolist()]
            _TABLES[protection.id] = {k: (c, s) for k, c, s in zip(keys, clusters, sums)}
        return _TABLES[protection.id]


def set_encoder(protection: Protection, encoder: Any) -> None:
    """Use ``encoder`` (an `ue_datasets.encoders.Encoder`) for ``protection`` in this process.

    Needed for protections fitted with a Python callable as encoder, which an artifact cannot hold
    (other encoders are rebuilt from the artifact's spec). The encoder's weights digest must match the
    one recorded at fit time when both are known. Spawned worker processes (``--workers``) do not see
    it: protect with one worker, or only fitted samples, which need no encoder.
    """
    recorded = protection.params.get("encoder", {}).get("weights_digest")
    given = getattr(encoder.spec, "weights_digest", None)
    if recorded and given and recorded != given:
        raise UEDatasetsError(f"encoder weights {given} differ from the ones the protection was fitted with ({recorded})")
    with _LOCK:
        for key in [k for k in _ENCODERS if k[0] == protection.id]:
            del _ENCODERS[key]
        _ENCODERS[(protection.id, "*")] = encoder


def use_encoder(protection: Protection, spec: str, device: torch.device | str = "cpu") -> Protection:
    """``protection`` with its surrogate encoder's weights found where ``spec`` says (moved, another machine).

    Args:
        spec: an encoder spec string (`ue_datasets.encoders.parse_encoder`, as ``fit clusters --encoder``)
            naming the weights the protection was fitted with; the preprocessing recorded at fit time is
            kept whatever the spec's defaults are.
        device: where the weights are loaded now, to check them (``"auto"``, ``"cpu"``, ``"cuda"``...).

    Returns:
        The same protection (id, tensors) recording ``spec`` as its encoder: spawned workers rebuild the
        encoder from it, and ``save`` writes an artifact that points at the new place. This process
        keeps the loaded encoder for it.

    Raises:
        UEDatasetsError: not a clusters protection; no weights digest recorded (a plain function was the
            encoder: use `set_encoder`); a bad spec, unreachable weights, or weights whose digest differs
            from the fitted ones (`ue_datasets.encoders.EncoderError`).
    """
    from ..encoders import EncoderSpec, load_encoder, parse_encoder
    from .core import resolve_device

    if protection.method != "clusters":
        raise UEDatasetsError(f"an encoder is only used by clusters protections; this one is {protection.method!r}")
    recorded = EncoderSpec.from_json(protection.params["encoder"])
    if recorded.weights_digest is None:
        raise UEDatasetsError(
            f"this protection records no weights digest for its encoder ({recorded.name}), so other weights "
            "cannot be checked: load the encoder and call ue_datasets.apply.clusters.set_encoder(protection, encoder)"
        )
    new = parse_encoder(spec)
    pointed = replace(recorded, kind=new.kind, name=new.name, weights=new.weights, model_config=new.model_config)
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # as images' devices name it, for the cache below
        device = torch.device("cuda", torch.cuda.current_device())
    encoder = load_encoder(pointed, device)  # refuses weights whose digest differs from the recorded one
    moved = Protection(protection.method, {**protection.params, "encoder": encoder.spec.to_json()},
                       protection.tensors, protection.id)
    with _LOCK:
        for key in [k for k in _ENCODERS if k[0] == protection.id]:
            del _ENCODERS[key]
        _ENCODERS[(protection.id, str(device))] = encoder
    return moved


def _load(protection: Protection, device: torch.device) -> Any:
    from ..encoders import EncoderError, EncoderSpec, load_encoder

    given = _ENCODERS.get((protection.id, "*"))
    if given is not None:
        return copy.deepcopy(given).to(device)
    spec = EncoderSpec.from_json(protection.params["encoder"])
    if spec.kind == "callable":
        raise UEDatasetsError(
            f"this protection was fitted with a Python callable as encoder ({spec.name}); new images need it to "
            "find their cluster: call ue_datasets.apply.clusters.set_encoder(protection, encoder) first "
            "(samples fitted with it are protected without it)"
        )
    try:
        return load_encoder(spec, device)
    except EncoderError as e:
        raise UEDatasetsError(
            f"new images need the protection's surrogate encoder to find their cluster, and it cannot be loaded: {e}. "
            "Make the weights reachable where the artifact says, or point at them: `ue-datasets protect --encoder "
            "SPEC` (ue_datasets.apply.clusters.use_encoder(protection, spec)); fitted samples need no encoder"
        ) from None


def encoder_for(protection: Protection, device: torch.device) -> Any:
    """The protection's surrogate encoder on ``device``, loaded (and its weights checked) once per process.

    Loaded outside the lock, so a slow load never blocks other protections' lookups; a concurrent
    first use may load twice and keep one.
    """
    key = (protection.id, str(device))
    with _LOCK:
        found = _ENCODERS.get(key)
    if found is None:
        found = _load(protection, device)
        with _LOCK:
            found = _ENCODERS.setdefault(key, found)
    return found


def assign_clusters(protection: Protection, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
    """The cluster of each image: stored for fitted samples, else the nearest center.

    Args:
        x: uint8 ``(B, C, H, W)``, C = 1 or 3.
        keys: sample keys, or ``None`` (every image then goes through the encoder).

    Returns:
        int64 ``(B,)`` on ``x``'s device.
    """
    clusters = torch.full((x.shape[0],), -1, dtype=torch.int64)
    if keys is not None:
        table = fitted_table(protection)
        hits = [table.get(str(k)) for k in keys]
        if any(h is not None for h in hits):
            sums = [tuple(s) for s in pixel_checksum(x).tolist()]
            for i, (hit, s) in enumerate(zip(hits, sums)):
                if hit is not None and hit[1] == s:
                    clusters[i] = hit[0]
    todo = (clusters < 0).nonzero().squeeze(1)
    if todo.numel():
        encoder = encoder_for(protection, x.device)
        feats = encoder.encode(x[todo.to(x.device)]).to(x.device)
        centers = protection.tensors["centers"].to(x.device)
        clusters[todo] = nearest_center(feats, centers).cpu()
    return clusters.to(x.device)


@register_lookup("cluster", uses={"keys"})
def delta_by_cluster(protection: Protection, x: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
    """Lookup of the ``clusters`` method: ``deltas[cluster]``, float32 ``(B, C, R, R)`` (`assign_clusters`);
    ``filters[cluster]``, ``(B, k, k)``, in ``filters`` mode."""
    return protection.tensors[table_of(protection)][assign_clusters(protection, x, keys)]
