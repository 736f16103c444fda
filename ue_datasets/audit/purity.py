"""How well a cluster-wise protection's clusters match the attacker's classes, and the oracle bound.

Unlearnable Clusters gives every image its cluster's perturbation. Such a perturbation is a shortcut a
classifier learns only as far as the clusters coincide with the classes it is trained on: on
Fashion-MNIST, k-means clusters of a surrogate encoder have a purity of about 0.6 w.r.t. the true
classes, and additive 16/255 noise then costs a classifier 2-4 points, while the same noise with
clusters = classes brings it from 85 % to 30-55 % (README). The audit therefore reports

- `cluster_purity` of the protector's clusters (`clusters_of`, the very clusters apply uses) w.r.t. the
  true and the attacker's labels, and
- an *oracle* training set: the clean images protected with the same perturbations but with clusters =
  the attacker's labels (`oracle_protection`), the most this perturbation could do with perfect clusters.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace

import torch

from ..apply.clusters import assign_clusters
from ..artifact import Protection
from ..errors import UEDatasetsError

#: Methods that give each sample the perturbation of its cluster.
CLUSTER_WISE = ("clusters",)
#: Below about this purity w.r.t. the attacker's labels, cluster-wise noise protects little (README).
PURITY = 0.9


def is_cluster_wise(protection: Protection) -> bool:
    """Whether ``protection`` perturbs by cluster (method ``clusters``), so purity and the oracle apply."""
    return protection.method in CLUSTER_WISE


def cluster_purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose cluster's majority label is their own label.

    Args:
        clusters: int64 ``(N,)``, cluster ids >= 0.
        labels: int64 ``(N,)``, labels >= 0.

    Returns:
        ``sum over clusters of (count of its most frequent label) / N``, in ``(0, 1]``: 1.0 when every
        cluster holds one label; with one cluster for all, the share of the most frequent label.

    Raises:
        UEDatasetsError: the lengths differ, or there are no samples.
    """
    clusters, labels = torch.as_tensor(clusters).reshape(-1), torch.as_tensor(labels).reshape(-1)
    if clusters.numel() != labels.numel():
        raise UEDatasetsError(f"cluster purity: {clusters.numel()} clusters for {labels.numel()} labels")
    if not clusters.numel():
        raise UEDatasetsError("cluster purity of no samples is undefined")
    clusters, labels = clusters.long().cpu(), labels.long().cpu()
    if int(clusters.min()) < 0 or int(labels.min()) < 0:
        raise UEDatasetsError("cluster purity needs cluster ids and labels >= 0")
    n_labels = int(labels.max()) + 1
    counts = torch.bincount(clusters * n_labels + labels, minlength=(int(clusters.max()) + 1) * n_labels)
    return float(counts.reshape(-1, n_labels).max(dim=1).values.sum()) / clusters.numel()


def clusters_of(protection: Protection, images: torch.Tensor, keys: Sequence[str] | None,
                batch_size: int = 256, device: torch.device | str | None = None) -> torch.Tensor:
    """The protector's cluster of each sample, as apply assigns it (`assign_clusters`), in batches.

    Args:
        images: uint8 ``(N, C, H, W)``, C = 1 or 3.
        keys: one sample key per image (fitted samples whose key and pixels match keep their stored
            cluster), or ``None`` (all through the surrogate encoder).
        device: where to run the encoder (default: the images' device).

    Returns:
        int64 ``(N,)`` on the CPU.
    """
    if not is_cluster_wise(protection):
        raise UEDatasetsError(f"clusters: a {protection.method!r} protection has no clusters")
    if keys is not None and len(keys) != images.shape[0]:
        raise UEDatasetsError(f"clusters: {len(keys)} keys for {images.shape[0]} images")
    dev = images.device if device is None else torch.device(device)
    prot = protection.to(dev)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(dev)
        out.append(assign_clusters(prot, x, None if keys is None else [str(k) for k in keys[i:i + batch_size]]).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def oracle_protection(protection: Protection) -> Protection:
    """The same perturbations with clusters = the attacker's labels: the cluster-wise protection's bound.

    A copy of ``protection`` (same method, parameters and tensors, shared, not copied; a new id) whose
    ``params["lookup"]`` is ``"class"`` and ``params["num_classes"]`` is K (``params["num_clusters"]``),
    so that ``protect_batch(oracle, x, labels=y % K)`` gives image i perturbation ``y[i] % K`` with the
    very kernel the protection uses (additive noise from ``deltas`` (K, C, R, R), or the filters of a
    ``kernel: filter`` protection). Attacker labels >= K wrap modulo K: with more classes than
    clusters, classes ``c`` and ``c + K`` share a perturbation (the oracle is then no longer perfect).

    Raises:
        UEDatasetsError: ``protection`` is not cluster-wise, or records no ``num_clusters``.
    """
    if not is_cluster_wise(protection):
        raise UEDatasetsError(f"an oracle needs a cluster-wise protection (method clusters), not {protection.method!r}")
    if "num_clusters" not in protection.params:
        raise UEDatasetsError("this clusters protection records no num_clusters")
    k = int(protection.params["num_clusters"])
    params = {**protection.params, "lookup": "class", "num_classes": k}
    return replace(protection, params=params, id=secrets.token_hex(16))
