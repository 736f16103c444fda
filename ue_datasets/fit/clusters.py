"""Fit Unlearnable Clusters (Zhang et al., CVPR 2023): label-agnostic cluster-wise perturbations.

Three stages, each with a progress bar:

1. features: every image is embedded with a surrogate encoder (`features.extract_features`,
   resumable parts on disk);
2. clusters: k-means (`kmeans`) on the features gives K centers and each sample's cluster;
3. perturbations: one ``delta_k`` per cluster, bounded by ``eps`` in L-inf, such that the surrogate
   features of ``x + delta_k`` move towards the *next* cluster's center ``(k + 1) mod K``:
   ``loss = KL(softmax(center_t) || softmax(f(x + delta_k)))`` (softmax over feature dimensions).

Two ways to get the deltas:

* ``mode="faithful"``, as the reference code (``methods.md`` §2.5-2.6; reconstructed, the code has no
  licence): per cluster a fresh ResNet generator with a fixed uniform noise input, Adam (lr 1e-4,
  weight decay 5e-4), cosine schedule per iteration to 1e-6, batches of 256 without shuffling, the
  images augmented (resize by 256/224, random crop back, horizontal flip) before the noise is added;
  ``delta_k = clamp(G_k(sigma_k), -eps, eps)`` with the generator left in train mode.
  Cost: K x epochs passes over the data.
* ``mode="fast"`` (ours): the K deltas are optimised directly, all in the same pass: each image of a
  batch draws a cluster, gets that cluster's delta and is pushed towards the next center; signed
  gradient steps (as PGD) of ``step * eps``, projected on the L-inf ball. Cost: epochs passes.

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
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..apply.core import resolve_device
from ..artifact import Protection
from ..errors import UEDatasetsError
from ..kernels.samples import encode_keys
from ..progress import progress_bar
from .budget import parse_eps
from .cost import MODES, StepTimer, estimate_cost, say, source_size
from .features import FeatureSet, extract_features, iter_features
from .generator import ResnetGenerator
from .kmeans import kmeans, minibatch_kmeans

KMEANS = ("full", "minibatch")
CHECKPOINT = "deltas-*.safetensors"
CLUSTER_DATA = ("all", "members")
DEFAULT_EPOCHS = {"faithful": 50, "fast": 10}
DEFAULT_LR = {"faithful": 1e-4, "fast": 0.1}


def kl_to_center(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(center) || softmax(z))`` per row, softmax over features.

    Args:
        z: ``(B, D)`` surrogate features; center: ``(B, D)`` or ``(D,)`` target centers.

    Returns:
        ``(B,)`` float.
    """
    p = F.softmax(center, dim=-1).expand_as(z)
    return F.kl_div(F.log_softmax(z, dim=-1), p, reduction="none").sum(-1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's Resize(256) -> RandomCrop(224) -> HFlip, scaled to ``x``'s size R.

    ``x``: float ``(B, C, R, R)``; upscaled to ``round(R * 256 / 224)``, one random crop per image.
    """
    r = x.shape[-1]
    big = round(r * 256 / 224)
    up = F.interpolate(x, size=(big, big), mode="bilinear", antialias=False, align_corners=False)
    offsets = torch.randint(0, big - r + 1, (x.shape[0], 2), generator=generator).tolist()
    flips = torch.rand(x.shape[0], generator=generator).lt(0.5).tolist()
    out = [up[i, :, a : a + r, b : b + r] for i, (a, b) in enumerate(offsets)]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips)])


def _train_images(data: FeatureSet, assignments: torch.Tensor, k: int | None) -> torch.Tensor:
    return data.images if k is None else data.images[assignments == k]


def _faithful(encoder, data: FeatureSet, centers: torch.Tensor, assignments: torch.Tensor, *, eps: float,
              epochs: int, lr: float, batch_size: int, cluster_data: str, seed: int, device: torch.device,
              checkpoint: Path, settings: dict[str, Any], progress: bool, timer: StepTimer) -> torch.Tensor:
    """One generator per cluster (see the module docstring). Resumes cluster by cluster."""
    K, C, R = centers.shape[0], data.images.shape[1], data.images.shape[-1]
    deltas = _load_checkpoint(checkpoint, settings)
    done = int(deltas.pop("done")) if "done" in deltas else 0
    out = deltas.get("deltas", torch.zeros(K, C, R, R))
    sizes = [len(data)] * K if cluster_data == "all" else torch.bincount(assignments, minlength=K).tolist()
    timer.begin(sum(epochs * math.ceil(sizes[k] / batch_size) for k in range(done, K)))
    for k in range(done, K):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)  # the generator's initial weights
            net = ResnetGenerator(3, C).to(device).train()
        sigma = torch.rand(1, 3, R, R, generator=g).to(device)
        target = centers[(k + 1) % K].to(device)
        images = _train_images(data, assignments, k if cluster_data == "members" else None)
        if not len(images):
            warnings.warn(f"cluster {k} has no members: its generator is not trained", stacklevel=2)
        steps = epochs * math.ceil(len(images) / batch_size)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=1e-6)
        bar = progress_bar(total=steps, desc=f"generator {k + 1}/{K}", disable=not progress)
        for _ in range(epochs):
            for i in range(0, len(images), batch_size):
                x = _augment(images[i : i + batch_size].to(device).float().div(255), g)
                delta = net(sigma).clamp(-eps, eps)
                loss = kl_to_center(encoder(torch.clamp(x + delta, 0, 1)), target).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                timer.tick()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3g}")
        bar.close()
        with torch.no_grad():  # train-mode batch norm, as the reference
            out[k] = net(sigma).clamp(-eps, eps)[0].cpu()
        _save_checkpoint(checkpoint, {"deltas": out, "done": torch.tensor(k + 1)}, settings)
    return out


def _fast(encoder, data: FeatureSet, centers: torch.Tensor, assignments: torch.Tensor, *, eps: float,
          epochs: int, lr: float, batch_size: int, cluster_data: str, seed: int, device: torch.device,
          checkpoint: Path, settings: dict[str, Any], progress: bool, timer: StepTimer) -> torch.Tensor:
    """All K deltas at once by signed gradient steps (see the module docstring). Resumes by epoch."""
    K, C, R = centers.shape[0], data.images.shape[1], data.images.shape[-1]
    g = torch.Generator().manual_seed(seed)
    state = _load_checkpoint(checkpoint, settings)
    start = int(state["done"]) if "done" in state else 0
    delta = state["deltas"] if "deltas" in state else (torch.rand(K, C, R, R, generator=g) * 2 - 1) * eps
    delta = delta.to(device).requires_grad_(True)
    centers = centers.to(device)
    n = len(data)
    steps = epochs * math.ceil(n / batch_size)
    bar = progress_bar(total=steps, initial=start * math.ceil(n / batch_size), desc="perturbations",
                       disable=not progress)
    timer.begin(steps - start * math.ceil(n / batch_size))
    for epoch in range(start, epochs):
        ge = torch.Generator().manual_seed(seed * 1000 + epoch + 1)
        order = torch.randperm(n, generator=ge)
        step = lr * eps * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = _augment(data.images[idx].to(device).float().div(255), ge)
            r = assignments[idx] if cluster_data == "members" else torch.randint(0, K, (len(idx),), generator=ge)
            r = r.to(device)
            loss = kl_to_center(encoder(torch.clamp(x + delta[r], 0, 1)), centers[(r + 1) % K]).mean()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= step * grad.sign()
                delta.clamp_(-eps, eps)
            timer.tick()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3g}")
        _save_checkpoint(checkpoint, {"deltas": delta.detach().cpu(), "done": torch.tensor(epoch + 1)}, settings)
    bar.close()
    return delta.detach().cpu()


def _load_checkpoint(path: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint of this very training (same settings and centers), else nothing."""
    from safetensors import safe_open

    if not path.exists():
        return {}
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("settings") != json.dumps(settings, sort_keys=True):
            return {}
        return {k: f.get_tensor(k) for k in f.keys()}


def _save_checkpoint(path: Path, state: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"settings": json.dumps(settings, sort_keys=True)})
    os.replace(tmp, path)


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
    progress: bool = True,
) -> Protection:
    """Fit an Unlearnable Clusters protection on the images of ``src``; no labels are read.

    Args:
        src: shards, a ``save_to_disk`` directory or parquet files (as ``ue-datasets protect``).
        encoder: an encoder spec string (``open_clip:RN50-quickgelu:/path/rn50-openai.pt``, ``local-dir:/path``,
            ``torchvision:resnet50:/path/weights.pth``), an `EncoderSpec` or a loaded `Encoder`
            (`ue_datasets.encoders.callable_encoder` wraps any callable).
        clusters: K, the number of clusters and perturbations (the reference uses 10).
        eps: L-inf bound, a float or ``"16/255"``.
        mode: ``"faithful"`` (default: one generator per cluster; at equal compute it protected as well
            as or better than fast on Fashion-MNIST, see the README) or ``"fast"`` (ours).
        cluster_data: ``"all"`` or ``"members"`` (see the module docstring).
        epochs: passes over the data (per cluster in faithful mode); default 50 faithful, 10 fast.
        lr: generator learning rate (faithful, 1e-4) or signed step as a fraction of eps (fast, 0.1,
            cosine-decayed over the epochs).
        resolution: side R of the stored deltas; default the encoder's input size. A multiple of 4.
        kmeans_mode: ``"full"`` (Lloyd on all features at once) or ``"minibatch"`` (Sculley's mini-batch
            k-means streamed part by part from the feature cache, for feature sets larger than memory).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        cache_dir: where features and checkpoints go (default: a temporary directory, removed after
            the fit); give one to resume an interrupted fit.
        keep_cache: keep what the fit wrote in ``cache_dir`` after it succeeds (`remove_cache` removes
            it, and nothing else, later).
        image_field, key_field: as for ``protect``; keys must be the ones used when protecting.
        limit: fit on the first ``limit`` samples only.
        progress: progress bars, the plan before the features stage and the stage's estimated duration
            (stderr); without, only advice when the perturbation stage looks longer than `cost.SLOW_SECONDS`.

    Returns:
        A `Protection` with method ``"clusters"``: tensors ``centers`` (K, D) float32, ``deltas``
        (K, C, R, R) float32 in [-eps, eps], and the fitted samples' ``assignments`` (N,) int64,
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
    eps = parse_eps(eps)
    dev = resolve_device(device)
    enc = encoder.to(dev) if isinstance(encoder, Encoder) else load_encoder(encoder, dev)
    enc.eval()
    R = resolution or enc.spec.size
    if R % 4:
        raise UEDatasetsError(f"resolution must be a multiple of 4 (the generator halves it twice), got {R}")
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else epochs
    lr = DEFAULT_LR[mode] if lr is None else lr
    cost = {"mode": mode, "clusters": clusters, "epochs": epochs, "batch_size": batch_size,
            "cluster_data": cluster_data}
    if progress:
        size = source_size(src)
        say(estimate_cost(images=min(size, limit or size) if size is not None else limit, **cost).line())
    temporary = cache_dir is None
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="ue-clusters-"))
    try:
        data = extract_features(src, enc, cache / "features", resolution=R, image_field=image_field,
                                key_field=key_field, batch_size=batch_size, limit=limit, progress=progress)
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

        train = _faithful if mode == "faithful" else _fast
        settings = {"mode": mode, "cluster_data": cluster_data, "eps": eps, "epochs": epochs, "lr": lr,
                    "batch_size": batch_size, "seed": seed, "resolution": R,
                    "centers": hashlib.sha256(km.centers.float().contiguous().numpy().tobytes()).hexdigest()}
        deltas = train(enc, data, km.centers, km.assignments, eps=eps, epochs=epochs, lr=lr, batch_size=batch_size,
                       cluster_data=cluster_data, seed=seed, device=dev, checkpoint=cache / f"deltas-{mode}.safetensors",
                       settings=settings, progress=progress, timer=StepTimer(report))
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
        "num_clusters": clusters, "eps": eps, "resolution": R, "channels": int(deltas.shape[1]),
        "mode": mode, "cluster_data": cluster_data, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "seed": seed, "kmeans_mode": kmeans_mode, "samples": len(data), "encoder": enc.spec.to_json(),
        "resize": "nearest", "rounding": "half-up",
        "cluster_sizes": torch.bincount(km.assignments, minlength=clusters).tolist(),
        "kmeans": {"inertia": km.inertia, "iterations": km.iterations},
    }
    tensors = {
        "centers": km.centers.float().contiguous(), "deltas": deltas.float().contiguous(),
        "assignments": km.assignments[unique].contiguous(), "checksums": data.checksums[unique].contiguous(),
        "keys_utf8": keys_utf8, "key_offsets": key_offsets,
    }
    protection = Protection("clusters", json.loads(json.dumps(params)), tensors)
    if enc.spec.kind == "callable":
        from ..apply.clusters import set_encoder

        set_encoder(protection, enc)
    return protection
