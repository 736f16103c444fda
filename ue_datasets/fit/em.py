"""Fit error-minimising noise (EM): Huang, Ma, Erfani, Bailey, Wang, "Unlearnable Examples", ICLR 2021.

``min_theta E[ min_{||delta||_inf <= eps} CE(f_theta(x + delta), y) ]``, solved as the reference code
(``HanxunH/Unlearnable-Examples`` @ f347155, MIT; ``methods.md`` §3) does, in rounds. A fresh surrogate
(seeded) trains with SGD (lr 0.1, momentum 0.9, weight decay 5e-4, gradient norm clipped to 5.0);
each round:

1. ``train_steps`` SGD steps on batches of ``clamp(x + delta, 0, 1)`` drawn from a persistent
   iterator (seeded shuffle per epoch, epochs continue across rounds);
2. the PGD pass, `min_min_attack` with the surrogate frozen:
   * sample-wise: every sample once, in source order, in batches of consecutive samples of one shape:
     ``delta_i = min_min_attack(start = delta_i)`` (``pgd_steps`` 20);
   * class-wise: ``delta`` is ``(num_classes, C, R, R)``; each batch of a seeded stratified
     ``subset`` (20 %, the reference's ``--use_subset``; reshuffled every round) gives
     ``eta = min_min_attack(start = delta[y])`` (``pgd_steps`` 1) and ``delta[c] = clamp(mean of eta_i
     with y_i = c, -eps, eps)`` for each class present;
3. the stop test: the surrogate's accuracy (eval mode) on ``clamp(x + delta, 0, 1)``: every sample
   (sample-wise) or the subset (class-wise). The fit stops once it reaches ``stop_accuracy`` (0.99, the
   QuickStart's criterion), or after ``max_rounds``.

Deliberate differences from the reference: ``x + delta`` is clamped to [0, 1] in the SGD steps and the
stop test (reference bug 3, ``methods.md`` §3.6); the stored noise keeps ``x + delta`` in range; the
training batches are shuffled (seeded, each of one image shape); class-wise fits on images of other sizes resize them to R x R (for the
fit only). The reference's clamp of the noise to [0, 255] before adding it (bug 1, issue #13) is
``legacy_clamp``; it changes how the noise is quantised (`quantise_levels`), not the fit.

Everything lives on disk in ``cache_dir`` (`ue_datasets.fit.store`): the source is decoded once into
``store/``; in ``em/`` (``salm/``) the sample-wise noise state is two float32 memmaps used in turn
(round r reads ``state-{r % 2}.f32`` and writes ``state-{(r + 1) % 2}.f32``), and after each round a checkpoint (JSON and safetensors, written atomically)
holds the surrogate, its optimizer, the RNG, the train iterator's position and the histories. A fit
restarted with the same arguments and ``cache_dir`` resumes after the last completed round; on CPU
the result is bit-identical to an uninterrupted run. A cache of other settings is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..apply.core import resolve_device
from ..artifact import Protection
from ..bank import Bank, BankWriter
from ..bank.format import prepare_directory
from ..errors import UEDatasetsError
from .budget import parse_eps
from .checkpoint import checkpoint_tensors, claim_cache, read_checkpoint, remove_cache
from .minmin import MOMENTUM, WEIGHT_DECAY, Fit, MaskProvider, classwise_rounds, samplewise_rounds
from .store import SampleStore, TrainStream, build_store, derive_seed
from .surrogates import (
    ChannelMatch,
    build_surrogate,
    check_surrogate,
    module_digest,
    restore_training_state,
    surrogate_name,
)

__all__ = ["DEFAULT_PGD_STEPS", "MAX_LEVEL", "MODES", "fit_em", "quantise_levels", "remove_cache", "run_fit"]

MODES = ("classwise", "samplewise")
#: PGD steps per pass by mode (the reference's settings, ``methods.md`` §3.3).
DEFAULT_PGD_STEPS = {"samplewise": 20, "classwise": 1}
#: The largest grey level a noise bank's int8 entries hold.
MAX_LEVEL = 127


def quantise_levels(delta: torch.Tensor, legacy_clamp: bool = False) -> torch.Tensor:
    """Float noise to the int8 grey levels a noise bank stores (apply adds them, then clamps to 0..255).

    Args:
        delta: float ``(..., C, H, W)`` in [-eps, eps] (pixel-range units), ``eps <= 127/255``.
        legacy_clamp: the reference's quantisation (bug 1): ``255 * delta`` clamped to [0, 255] before
            it is added, so negative noise is dropped, then truncated: ``floor(clamp(255 * delta, 0, 255))``.
            Default: ``floor(255 * delta + 0.5)`` (half up), so ``|d| <= floor(255 * eps + 0.5)``.

    Returns:
        int8, the shape of ``delta``.
    """
    scaled = delta.float() * 255
    levels = scaled.clamp(0, 255).floor() if legacy_clamp else (scaled + 0.5).floor()
    return levels.clamp(-MAX_LEVEL, MAX_LEVEL).to(torch.int8)


def _write_bank(store: SampleStore, noise: np.memmap, directory: Path, batch_size: int, legacy_clamp: bool) -> Bank:
    """Quantise every sample's noise (`quantise_levels`) into a new noise bank in ``directory``."""
    writer = BankWriter(directory)
    try:
        for idx in store.runs(batch_size):
            writer.add_batch([store.keys[i] for i in idx.tolist()], store.checksums[idx],
                             quantise_levels(store.read(noise, idx), legacy_clamp))
    except BaseException:
        writer.abort()  # no half-written bank is left
        raise
    return writer.close()


def _check_unique(store: SampleStore) -> None:
    """Refuse, before fitting, two samples a noise bank could not tell apart (same key, same pixels)."""
    seen: set[tuple[str, int, int]] = set()
    for key, (a, b) in zip(store.keys, store.checksums.tolist()):
        if (key, a, b) in seen:
            raise UEDatasetsError(f"two samples have the key {key!r} and the same pixels; a noise bank finds "
                                  "noise by key and pixels: give unique keys (key_field) or drop the duplicate")
        seen.add((key, a, b))


def _check(name: str, value: Any, ok: bool, what: str) -> None:
    if not ok:
        raise UEDatasetsError(f"{name} must be {what}, got {value!r}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def run_fit(method: str, src: str, *, mode: str, masker: MaskProvider | None = None,
            extra: dict[str, Any] | None = None, label_field: str | None = None, image_field: str | None = None,
            key_field: str | None = None, num_classes: int | None = None, surrogate: str | nn.Module = "auto",
            eps: float | str = 8 / 255, step_size: float | str = 0.8 / 255, pgd_steps: int | None = None,
            train_steps: int = 10, stop_accuracy: float = 0.99, max_rounds: int | None = None,
            batch_size: int = 512, lr: float = 0.1, subset: float = 0.2, resolution: int | None = None,
            legacy_clamp: bool = False, device: str | torch.device = "auto", seed: int = 0,
            cache_dir: str | os.PathLike | None = None, keep_cache: bool = False,
            bank_dir: str | os.PathLike | None = None, limit: int | None = None, progress: bool = True) -> Protection:
    """The fit shared by `fit_em` and SALM (`ue_datasets.fit.salm.fit_salm`): see `fit_em`.

    ``method`` names the protection and the checkpoint folder; ``masker`` (sample-wise only) restricts
    the noise; ``extra`` goes into the parameters and the checkpoint's settings.
    """
    _check("mode", mode, mode in MODES, f"one of {MODES}")
    eps, step_size = parse_eps(eps), parse_eps(step_size)
    pgd_steps = DEFAULT_PGD_STEPS[mode] if pgd_steps is None else pgd_steps
    for name, value in (("pgd_steps", pgd_steps), ("train_steps", train_steps), ("batch_size", batch_size)):
        _check(name, value, _positive_int(value), "a positive integer")
    _check("max_rounds", max_rounds, max_rounds is None or _positive_int(max_rounds), "None or a positive integer")
    _check("limit", limit, limit is None or _positive_int(limit), "None or a positive integer")
    _check("num_classes", num_classes, num_classes is None or _positive_int(num_classes), "None or a positive integer")
    _check("stop_accuracy", stop_accuracy, 0 < stop_accuracy <= 1, "in (0, 1]")
    _check("lr", lr, lr > 0, "positive")
    if mode == "classwise":
        _check("subset", subset, 0 < subset <= 1, "in (0, 1]")
        _check("resolution", resolution, resolution is None or _positive_int(resolution), "None or a positive integer")
    else:
        _check("resolution", resolution, resolution is None, "None for a sample-wise fit (noise is image-sized)")
        _check("eps", eps, eps <= MAX_LEVEL / 255, f"at most {MAX_LEVEL}/255 for a sample-wise fit (int8 levels)")
    check_surrogate(surrogate)
    dev = resolve_device(device)
    if mode == "samplewise" and bank_dir is not None:
        prepare_directory(Path(bank_dir))  # a bank_dir that would be refused is refused now, not after the fit
    temporary = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix=f"ue-{method}-")) if temporary else Path(cache_dir)
    claim_cache(cache)
    directory = cache / method
    try:
        store = build_store(src, cache / "store", image_field=image_field, label_field=label_field,
                            key_field=key_field, num_classes=num_classes, limit=limit, progress=progress)
        K, C = store.num_classes, store.channels
        if mode == "samplewise":
            _check_unique(store)
        if mode == "classwise":
            common = store.common_size()
            if resolution is None and (common is None or common[0] != common[1]):
                raise UEDatasetsError(f"{src}: the images are not all square and of one size; give resolution "
                                      "(the side of the class-wise noise; images are resized to it for the fit)")
            side = resolution or common[0]
        else:
            side = int(store.shapes[:, 1:].min())
        forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            model = ChannelMatch(build_surrogate(surrogate, K, C, side, dev), C)
            settings = {"method": method, "mode": mode, "source": src, "label_field": label_field,
                        "image_field": image_field, "key_field": key_field, "limit": limit, "num_classes": K,
                        "eps": eps, "step_size": step_size, "pgd_steps": pgd_steps, "train_steps": train_steps,
                        "stop_accuracy": stop_accuracy, "max_rounds": max_rounds, "batch_size": batch_size,
                        "lr": lr, "subset": subset if mode == "classwise" else None,
                        "resolution": side if mode == "classwise" else None, "seed": seed,
                        "surrogate": surrogate_name(surrogate, dev), "device": dev.type,
                        "surrogate_digest": module_digest(model) if isinstance(surrogate, nn.Module) else None,
                        **(extra or {})}
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            directory.mkdir(parents=True, exist_ok=True)
            state = read_checkpoint(directory, settings)
            tensors: dict[str, torch.Tensor] = {}
            if state is None:
                state = {"settings": settings, "round": 0, "current": 0, "epoch": 0, "position": 0,
                         "accuracy_history": [], "loss_history": [], "stopped": None}
            else:
                tensors = checkpoint_tensors(directory, state)
                restore_training_state(model, optimizer, tensors)
            stream = TrainStream(store, batch_size, derive_seed(seed, "train"), by_shape=mode == "samplewise",
                                 epoch=state["epoch"], position=state["position"])
            fit = Fit(method, store, directory, dev, model, optimizer, stream, eps, step_size, pgd_steps,
                       train_steps, stop_accuracy, max_rounds, batch_size, seed, progress)
            if mode == "classwise":
                state, deltas = classwise_rounds(fit, state, tensors, side, subset)
                result = {"deltas": deltas}
            else:
                state, noise = samplewise_rounds(fit, state, masker)
                if bank_dir is None:  # removed with the bank object: save the protection to keep it
                    scratch = tempfile.mkdtemp(prefix=f"ue-{method}-bank-")
                    bank = _write_bank(store, noise, Path(scratch) / "bank", batch_size, legacy_clamp)
                    weakref.finalize(bank, shutil.rmtree, scratch, True)
                else:
                    bank = _write_bank(store, noise, Path(bank_dir), batch_size, legacy_clamp)
                result = {}
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)
    if not temporary and not keep_cache:
        remove_cache(cache, method)
    params = {**{k: v for k, v in settings.items() if k not in ("method", "source", "label_field", "image_field",
                                                                "key_field", "limit", "surrogate_digest")},
              "lookup": "class" if mode == "classwise" else "key", "channels": C, "legacy_clamp": legacy_clamp,
              "rounding": "truncate" if legacy_clamp else "half-up", "samples": len(store), "rounds": state["round"],
              "accuracy_history": state["accuracy_history"], "loss_history": state["loss_history"],
              "stopped": state["stopped"]}
    if mode == "samplewise":
        params["bank"] = {"entries": bank.entries, "digest": bank.digest}
    protection = Protection(method, json.loads(json.dumps(params)), result)
    if mode == "samplewise":
        object.__setattr__(protection, "bank", bank)
    return protection


def fit_em(src: str, *, mode: str = "classwise", label_field: str | None = None, image_field: str | None = None,
           key_field: str | None = None, num_classes: int | None = None, surrogate: str | nn.Module = "auto",
           eps: float | str = 8 / 255, step_size: float | str = 0.8 / 255, pgd_steps: int | None = None,
           train_steps: int = 10, stop_accuracy: float = 0.99, max_rounds: int | None = None, batch_size: int = 512,
           lr: float = 0.1, subset: float = 0.2, resolution: int | None = None, legacy_clamp: bool = False,
           device: str | torch.device = "auto", seed: int = 0, cache_dir: str | os.PathLike | None = None,
           keep_cache: bool = False, bank_dir: str | os.PathLike | None = None, limit: int | None = None,
           progress: bool = True) -> Protection:
    """Fit error-minimising noise on the labelled images of ``src`` (module docstring).

    Args:
        src: shards, a ``save_to_disk`` directory or parquet files (as ``ue-datasets protect``).
        mode: ``"classwise"`` (one delta per class) or ``"samplewise"`` (one per image, at its size).
        label_field, image_field, key_field: as for ``protect``; keys must be the ones used when protecting.
        num_classes: labels are ints in ``[0, num_classes)``; default ``max(label) + 1``.
        surrogate: ``"auto"`` (CIFAR-style ``resnet18`` on CUDA, ``small-cnn`` on CPU), a name of
            `ue_datasets.audit.models.build_model`, or an ``nn.Module`` (a copy is trained).
        eps: L-inf bound, a float or ``"8/255"``; sample-wise at most 127/255.
        step_size: PGD step, a float or ``"0.8/255"``.
        pgd_steps: PGD steps per pass; default 20 sample-wise, 1 class-wise.
        train_steps: SGD steps per round (the reference's 10).
        stop_accuracy: stop once the surrogate's accuracy on the noisy images reaches it.
        max_rounds: stop after this many rounds at the latest (default: no limit).
        batch_size: images per batch (SGD, PGD, stop test).
        lr: the surrogate's SGD learning rate.
        subset: class-wise: fraction of each class the PGD pass and the stop test use.
        resolution: class-wise: side R of the deltas; default the images' common size (required when
            the images are not all square and of one size). Sample-wise: must stay None.
        legacy_clamp: quantise as the reference (negative noise dropped, truncated); see `quantise_levels`.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        seed: seeds the surrogate, the shuffles and the subset.
        cache_dir: the sample store and checkpoints (default: a temporary directory removed afterwards);
            give one to resume an interrupted fit.
        keep_cache: keep what the fit wrote in ``cache_dir`` after it succeeds (`remove_cache` removes it later).
        bank_dir: sample-wise: a new or empty directory for the noise bank (checked before the fit);
            default a temporary directory removed with the returned protection's bank: save the
            protection (`Protection.save`) to keep it.
        limit: fit on the first ``limit`` samples only.
        progress: progress bars on stderr (decoding; rounds with the accuracy and the stop criterion).

    Returns:
        Class-wise: ``Protection("em", params, {"deltas": float32 (num_classes, C, R, R) in [-eps, eps]})``,
        ``params["lookup"] == "class"``. Sample-wise: ``Protection("em", params, {})`` with
        ``params["lookup"] == "key"``, and the opened noise bank as its ``bank`` attribute (int8 levels
        per sample, found by key and pixel checksum; ``params["bank"]`` holds its entries and digest).
        ``params`` also record every setting, ``samples``, ``rounds``, ``accuracy_history``,
        ``loss_history`` (mean cross-entropy in each stop test) and ``stopped`` (``"accuracy"`` or
        ``"max_rounds"``).

    Raises:
        SampleError: an undecodable image or a label that is not a class id (names file and key).
        UEDatasetsError: bad settings; a cache of another fit.
    """
    return run_fit("em", src, mode=mode, label_field=label_field, image_field=image_field, key_field=key_field,
                   num_classes=num_classes, surrogate=surrogate, eps=eps, step_size=step_size, pgd_steps=pgd_steps,
                   train_steps=train_steps, stop_accuracy=stop_accuracy, max_rounds=max_rounds,
                   batch_size=batch_size, lr=lr, subset=subset, resolution=resolution, legacy_clamp=legacy_clamp,
                   device=device, seed=seed, cache_dir=cache_dir, keep_cache=keep_cache, bank_dir=bank_dir,
                   limit=limit, progress=progress)
