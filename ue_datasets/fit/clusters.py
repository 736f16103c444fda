"""Fit Unlearnable Clusters (Zhang et al., CVPR 2023): label-agnostic cluster-wise perturbations.

Three stages, each with a progress bar:

1. features: every image is embedded with a surrogate encoder (`features.extract_features`,
   resumable parts on disk);
2. clusters: k-means (`kmeans`) on the features gives K centers and each sample's cluster;
3. perturbations: one per cluster: a ``delta_k`` bounded by ``eps`` in L-inf, optimised so that the
   surrogate features of ``x + delta_k`` move towards the *next* cluster's center ``(k + 1) mod K``
   (``loss = KL(softmax(center_t) || softmax(f(x + delta_k)))``, softmax over feature dimensions), or
   drawn from a key (block patterns, filters).

Four ways to get the perturbations (``mode``):

* ``"faithful"``, as the reference code (``methods.md`` §2.5-2.6; reconstructed, the code has no
  licence): per cluster a fresh ResNet generator with a fixed uniform noise input, Adam (lr 1e-4,
  weight decay 5e-4), cosine schedule per iteration to 1e-6, batches of 256 without shuffling, the
  images augmented (resize by 256/224, random crop back, horizontal flip) before the noise is added;
  ``delta_k = clamp(G_k(sigma_k), -eps, eps)`` with the generator left in train mode.
  Cost: K x epochs passes over the data (`cluster_deltas.train_generators`).
* ``"fast"`` (ours): the K deltas are optimised directly, all in the same pass: each image of a
  batch draws a cluster, gets that cluster's delta and is pushed towards the next center; signed
  gradient steps (as PGD) of ``step * eps``, projected on the L-inf ball. Cost: epochs passes
  (`cluster_deltas.train_deltas`).
* ``"blocks"`` (ours): key-derived low-frequency ``+-eps`` block patterns (`cluster_patterns`), bounded
  by eps as the others; with ``epochs > 0`` refined by the fast mode's steps from that start.
* ``"filters"``: a key-derived CUDA filter per cluster (`cluster_patterns`), applied by the
  convolution kernel (``params["kernel"] = "filter"``); **not bounded in L-inf** (``eps`` is ignored).

``cluster_data`` decides which images train ``delta_k``: ``"all"`` (every image, as the reference
code, whose generators all train on the whole set) or ``"members"`` (only cluster k's images, the
reading of the paper's figure). ``"all"`` is the default, to match the code that produced the
paper's numbers.

Cost: `estimate_cost`. With ``progress=True`` the fit prints its plan to stderr before the features
stage (passes, and the images when the source tells its size: parquet, ``save_to_disk``, or
``limit``), and, after timing the first optimisation steps, how long the perturbation stage will take,
with advice (``--mode fast``, ``--limit``, ``--epochs``) when that is over `cost.SLOW_SECONDS`. Quiet fits
(``progress=False``) print only that advice, and only when the stage is that slow.

Deviations from the reference, on purpose: features use the encoder's own preprocessing (open_clip:
its config, bicubic shorter-side resize and center crop; the reference resizes to 256 and crops 224,
bilinear); k-means runs once from greedy k-means++ (``n_init=1``; the reference's scikit-learn of the
time ran 10 inits); the perturbation is trained on copies of the images squashed to R x R (the
aspect ratio is not kept, because apply stretches ``delta`` over the whole image) rather than on
Resize(256) crops of the originals; generators and deltas are seeded per cluster. The R x R copies of
all images are held in memory during the perturbation stage (N x C x R x R bytes: use ``limit`` or a
smaller ``resolution`` for very large sets); features can be clustered part by part
(``kmeans_mode="minibatch"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..apply.core import resolve_device
from ..artifact import Protection
from ..errors import UEDatasetsError
from ..kernels.samples import encode_keys
from .budget import parse_eps
from .cluster_deltas import train_deltas, train_generators
from .cluster_patterns import DEFAULT_GRID, block_patterns, check_grid, cluster_filters, pattern_key
from .convolution import check_filter_options
from .cost import MODES, StepTimer, estimate_cost, say, source_size
from .features import extract_features, iter_features
from .kmeans import kmeans, minibatch_kmeans

KMEANS = ("full", "minibatch")
CHECKPOINT = "deltas-*.safetensors"
CLUSTER_DATA = ("all", "members")
DEFAULT_EPOCHS = {"faithful": 50, "fast": 10, "blocks": 0, "filters": 0}
DEFAULT_LR = {"faithful": 1e-4, "fast": 0.1, "blocks": 0.1, "filters": 0.0}
#: Modes whose perturbations come from a key (and so take ``key``).
KEYED = ("blocks", "filters")


def remove_cache(cache: str | os.PathLike) -> None:
    """Remove what a fit wrote into ``cache`` (features, checkpoints); the folder only if then empty."""
    cache = Path(cache)
    shutil.rmtree(cache / "features", ignore_errors=True)
    for f in cache.glob(CHECKPOINT):
        f.unlink()
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()


def fit_clusters(
    src: str,
    encoder: Any,
    *,
    clusters: int = 10,
    eps: float | str = 16 / 255,
    mode: str = "faithful",
    cluster_data: str = "all",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 256,
    resolution: int | None = None,
    seed: int = 0,
    kmeans_mode: str = "full",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike | None = None,
    keep_cache: bool = False,
    image_field: str | None = None,
    key_field: str | None = None,
    limit: int | None = None,
    key: int | None = None,
    grid: int = DEFAULT_GRID,
    kernel_size: int = 3,
    blur: float = 0.3,
    progress: bool = True,
    engine: Any = "local",
) -> Protection:
    """Fit an Unlearnable Clusters protection on the images of ``src``; no labels are read.

    Args:
        src: shards, a ``save_to_disk`` directory or parquet files (as ``ue-datasets protect``).
        encoder: an encoder spec string (``open_clip:RN50-quickgelu:/path/rn50-openai.pt``, ``local-dir:/path``,
            ``torchvision:resnet50:/path/weights.pth``), an `EncoderSpec` or a loaded `Encoder`
            (`ue_datasets.encoders.callable_encoder` wraps any callable).
        clusters: K, the number of clusters and perturbations (the reference uses 10).
        eps: L-inf bound, a float or ``"16/255"`` (not used by ``filters``, which is unbounded).
        mode: ``"faithful"`` (default: one generator per cluster; of the modes bounded by eps it
            protected Fashion-MNIST best, see the README), ``"fast"``, ``"blocks"`` or ``"filters"``
            (unbounded; see the module docstring).
        cluster_data: ``"all"`` or ``"members"`` (see the module docstring).
        epochs: passes over the data (per cluster in faithful mode); default 50 faithful, 10 fast, 0 blocks
            (no refinement); filters takes none.
        lr: generator learning rate (faithful, 1e-4) or signed step as a fraction of eps (fast, 0.1,
            cosine-decayed over the epochs).
        resolution: side R of the stored deltas; default the encoder's input size. A multiple of 4 in
            faithful mode.
        kmeans_mode: ``"full"`` (Lloyd on all features at once) or ``"minibatch"`` (Sculley's mini-batch
            k-means streamed part by part from the feature cache, for feature sets larger than memory).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        cache_dir: where features and checkpoints go (default: a temporary directory, removed after
            the fit); give one to resume an interrupted fit.
        keep_cache: keep what the fit wrote in ``cache_dir`` after it succeeds (`remove_cache` removes
            it, and nothing else, later).
        image_field, key_field: as for ``protect``; keys must be the ones used when protecting.
        limit: fit on the first ``limit`` samples only.
        key: the private integer key in ``[0, 2**32)`` of ``blocks`` and ``filters`` (default: a fresh secret
            one, not stored: the artifact holds the patterns); other modes refuse one (they use ``seed``).
        grid: blocks per side of a ``blocks`` pattern.
        kernel_size, blur: size k and entry bound p_b of the ``filters`` mode's CUDA filters.
        progress: progress bars, the plan before the features stage and the stage's estimated duration
            (stderr); without, only advice when the perturbation stage looks longer than `cost.SLOW_SECONDS`.
        engine: ``"local"``, or ``"ray"`` or a `ue_datasets.apply.ray.RayEngine`: the features pass runs one
            Ray task per input file (`ue_datasets.fit.features`); the rest of the fit runs here.

    Returns:
        A `Protection` with method ``"clusters"``: tensors ``centers`` (K, D) float32, ``deltas``
        (K, C, R, R) float32 in [-eps, eps] (``filters``: ``filters`` (K, k, k) float32 instead), and the fitted samples' ``assignments`` (N,) int64,
        ``checksums`` (N, 2) int64 and keys (``keys_utf8``, ``key_offsets``).
    """
    from ..encoders import Encoder, load_encoder

    if mode not in MODES:
        raise UEDatasetsError(f"mode must be one of {MODES}, got {mode!r}")
    if cluster_data not in CLUSTER_DATA:
        raise UEDatasetsError(f"cluster_data must be one of {CLUSTER_DATA}, got {cluster_data!r}")
    if kmeans_mode not in KMEANS:
        raise UEDatasetsError(f"kmeans_mode must be one of {KMEANS}, got {kmeans_mode!r}")
    if clusters < 2:
        raise UEDatasetsError(f"clusters must be >= 2 (each cluster is pushed towards the next one), got {clusters}")
    if limit is not None and limit < clusters:
        raise UEDatasetsError(f"limit {limit} leaves fewer samples than the {clusters} clusters")
    if key is not None and mode not in KEYED:
        raise UEDatasetsError(f"key is used by the {' and '.join(KEYED)} modes; {mode} mode is seeded by seed")
    if mode == "filters" and epochs:
        raise UEDatasetsError("filters mode has no training (its filters come from the key): epochs must be 0")
    key = pattern_key(key) if mode in KEYED else None
    if mode == "filters":
        check_filter_options(kernel_size, blur)
    eps = parse_eps(eps)
    dev = resolve_device(device)
    enc = encoder.to(dev) if isinstance(encoder, Encoder) else load_encoder(encoder, dev)
    enc.eval()
    R = resolution or enc.spec.size
    if R % 4 and mode == "faithful":
        raise UEDatasetsError(f"resolution must be a multiple of 4 (the generator halves it twice), got {R}")
    if mode == "blocks":
        check_grid(grid, R)
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else epochs
    lr = DEFAULT_LR[mode] if lr is None else lr
    cost = {"mode": mode, "clusters": clusters, "epochs": epochs, "batch_size": batch_size,
            "cluster_data": cluster_data}
    if progress and epochs:
        size = source_size(src)
        say(estimate_cost(images=min(size, limit or size) if size is not None else limit, **cost).line())
    temporary = cache_dir is None
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="ue-clusters-"))
    try:
        data = extract_features(src, enc, cache / "features", resolution=R, image_field=image_field,
                                key_field=key_field, batch_size=batch_size, limit=limit, progress=progress,
                                engine=engine)
        if len(data) < clusters:
            raise UEDatasetsError(f"{src}: {len(data)} samples cannot make {clusters} clusters")
        if kmeans_mode == "full":
            km = kmeans(data.features, clusters, seed=seed, device=dev, progress=progress)
        else:
            km = minibatch_kmeans(lambda: iter_features(cache / "features"), clusters, seed=seed, device=dev,
                                  progress=progress)

        def report(seconds_per_step: float, steps: int) -> None:
            estimate = estimate_cost(images=len(data), steps=steps, seconds_per_step=seconds_per_step, **cost)
            if progress or estimate.slow:
                say(estimate.line())
            if estimate.slow:
                say(estimate.advice())

        C = int(data.images.shape[1])
        start = block_patterns(clusters, C, R, eps, key, grid) if mode == "blocks" else None
        if mode == "filters":
            table = {"filters": cluster_filters(clusters, key, kernel_size, blur)}
        elif mode == "blocks" and not epochs:
            table = {"deltas": start}
        else:
            settings = {"mode": mode, "cluster_data": cluster_data, "eps": eps, "epochs": epochs, "lr": lr,
                        "batch_size": batch_size, "seed": seed, "resolution": R,
                        "centers": hashlib.sha256(km.centers.float().contiguous().numpy().tobytes()).hexdigest(),
                        **({"start": hashlib.sha256(start.numpy().tobytes()).hexdigest()} if start is not None else {})}
            train = train_generators if mode == "faithful" else train_deltas
            extra = {"init": start} if start is not None else {}
            table = {"deltas": train(enc, data, km.centers, km.assignments, eps=eps, epochs=epochs, lr=lr,
                                     batch_size=batch_size, cluster_data=cluster_data, seed=seed, device=dev,
                                     checkpoint=cache / f"deltas-{mode}.safetensors", settings=settings,
                                     progress=progress, timer=StepTimer(report), **extra)}
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)
    if not temporary and not keep_cache:
        remove_cache(cache)
    counts = Counter(data.keys)
    unique = torch.tensor([counts[k] == 1 for k in data.keys], dtype=torch.bool)
    if not bool(unique.all()):
        warnings.warn(
            f"{int((~unique).sum())} samples share their key with another one; they are not stored by key "
            "and will be assigned by the encoder when protected (pass --key-field with unique keys)",
            stacklevel=2,
        )
    keys = [k for k, u in zip(data.keys, unique.tolist()) if u]
    keys_utf8, key_offsets = encode_keys(keys)
    params = {
        "num_clusters": clusters, "resolution": R, "channels": C, "mode": mode, "cluster_data": cluster_data,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "kmeans_mode": kmeans_mode,
        "samples": len(data), "encoder": enc.spec.to_json(),
        "cluster_sizes": torch.bincount(km.assignments, minlength=clusters).tolist(),
        "kmeans": {"inertia": km.inertia, "iterations": km.iterations},
    }
    if mode == "filters":  # CUDA's kernel and quantisation; unbounded in L-inf
        params.update({"kernel": "filter", "eps": None, "kernel_size": kernel_size, "blur": blur, "grayscale": False,
                       "quantize": "truncate", "padding": "zeros"})
    else:
        params.update({"eps": eps, "resize": "nearest", "rounding": "half-up"})
    if mode == "blocks":
        params["grid"] = grid
    tensors = {
        "centers": km.centers.float().contiguous(), **{k: v.float().contiguous() for k, v in table.items()},
        "assignments": km.assignments[unique].contiguous(), "checksums": data.checksums[unique].contiguous(),
        "keys_utf8": keys_utf8, "key_offsets": key_offsets,
    }
    protection = Protection("clusters", json.loads(json.dumps(params)), tensors)
    if enc.spec.kind == "callable":
        from ..apply.clusters import set_encoder

        set_encoder(protection, enc)
    return protection


def label_purity(protection: Protection, src: str | list[str], *, label_field: str | None = None,
                 image_field: str | None = None, key_field: str | None = None) -> float:
    """Purity of a fit's clusters w.r.t. the labels ``src`` carries.

    Information for the protector only (the fit reads no labels): the share of fitted samples whose
    cluster's majority label is their own (`ue_datasets.audit.purity.cluster_purity`). Below about
    `PURITY`, cluster-wise noise protects little against an attacker who trains on those labels (README).
    Reads the source (never writes) until every fitted sample is found.

    Raises:
        SampleError: a sample has no (integer) label; the source carries none, say.
        UEDatasetsError: no fitted sample is in ``src``, or the source cannot be read.
    """
    from ..apply.clusters import fitted_table
    from ..apply.records import iter_records
    from ..audit.purity import cluster_purity

    table = fitted_table(protection)
    found: dict[str, tuple[int, int]] = {}
    for record in iter_records(src, image_field=image_field, label_field=label_field, key_field=key_field,
                               labels=True):
        hit = table.get(record.key)
        if hit is not None:
            found.setdefault(record.key, (hit[0], int(record.label)))
            if len(found) == len(table):
                break
    if not found:
        raise UEDatasetsError(f"{src}: none of the fitted samples is there")
    clusters, labels = zip(*found.values())
    return cluster_purity(torch.tensor(clusters), torch.tensor(labels))
