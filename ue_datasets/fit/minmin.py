"""The min-min rounds of error-minimising noise (`ue_datasets.fit.em`): class-wise and sample-wise.

Each round trains the surrogate a few steps on the protected images, then runs the PGD pass on the
noise with the surrogate frozen, then the stop test; `Fit.loop` checkpoints after every round
(`ue_datasets.fit.checkpoint`). The module docstring of `ue_datasets.fit.em` describes the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..progress import progress_bar
from .checkpoint import write_checkpoint
from .pgd import min_min_attack
from .store import SampleStore, TrainStream, derive_seed
from .surrogates import evaluate, sgd_steps, training_state

#: The surrogate's SGD, as the reference: momentum, weight decay, gradient-norm clip.
MOMENTUM, WEIGHT_DECAY, CLIP_NORM = 0.9, 5e-4, 5.0


class MaskProvider(Protocol):
    """Where a sample-wise fit may perturb (SALM): ``refresh`` is ``"once"`` (computed in the first
    round, then read back) or ``"round"`` (recomputed in every round's PGD pass)."""

    refresh: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[str],
                 round_index: int) -> torch.Tensor:
        """Float ``(B, 1, H, W)`` of 0 and 1 for images ``x`` float ``(B, C, H, W)`` in [0, 1]."""
        ...


@dataclass
class Fit:
    """What every round needs."""

    method: str
    store: SampleStore
    directory: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: TrainStream
    eps: float
    step_size: float
    pgd_steps: int
    train_steps: int
    stop_accuracy: float
    max_rounds: int | None
    batch_size: int
    seed: int
    progress: bool

    def x(self, idx: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Float ``(B, C, H, W)`` in [0, 1] on the device: samples ``idx`` (resized to ``size`` x ``size``
        and in the store's channels when given)."""
        raw = self.store.images(idx) if size is None else self.store.resized(idx, size, self.store.channels)
        return raw.to(self.device).float().div_(255)

    def y(self, idx: torch.Tensor) -> torch.Tensor:
        return self.store.labels[idx].to(self.device)

    def train(self, inputs: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``train_steps`` SGD steps on ``(inputs(idx), y)`` for the stream's next batches."""
        batches = (self.stream.next() for _ in range(self.train_steps))
        sgd_steps(self.model, self.optimizer, ((inputs(idx), self.y(idx)) for idx in batches), CLIP_NORM)

    def loop(self, state: dict[str, Any], one_round: Callable[[int], tuple[float, float]],
             tensors: Callable[[], dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Run rounds from ``state`` (a checkpoint, or a fresh one) until a stop; checkpoint each."""
        bar = progress_bar(total=self.max_rounds, initial=state["round"], desc=f"{self.method} rounds",
                           unit="round", disable=not self.progress)
        try:
            while state["stopped"] is None:
                r = state["round"]
                accuracy, loss = one_round(r)
                state["accuracy_history"].append(accuracy)
                state["loss_history"].append(loss)
                state["round"] = r + 1
                if accuracy >= self.stop_accuracy:
                    state["stopped"] = "accuracy"
                elif self.max_rounds is not None and r + 1 >= self.max_rounds:
                    state["stopped"] = "max_rounds"
                state.update(current=(r + 1) % 2, epoch=self.stream.epoch, position=self.stream.position)
                write_checkpoint(self.directory, state, {**training_state(self.model, self.optimizer), **tensors()})
                bar.set_postfix(round=r + 1, accuracy=f"{accuracy:.4f}", stop=f"accuracy>={self.stop_accuracy}")
                bar.update(1)
        finally:
            bar.close()
        return state


def classwise_rounds(fit: Fit, state: dict[str, Any], tensors: dict[str, torch.Tensor], resolution: int,
               subset: float) -> tuple[dict[str, Any], torch.Tensor]:
    """The class-wise loop (module docstring); returns the final state and deltas float32 ``(K, C, R, R)``."""
    store, eps = fit.store, fit.eps
    K, C, R = store.num_classes, store.channels, resolution
    delta = tensors["deltas"].to(fit.device) if "deltas" in tensors else torch.zeros(K, C, R, R, device=fit.device)
    chosen = store.stratified(subset, derive_seed(fit.seed, "subset")) if subset < 1 else torch.arange(len(store))

    def one_round(r: int) -> tuple[float, float]:
        fit.train(lambda idx: torch.clamp(fit.x(idx, R) + delta[fit.y(idx)], 0, 1))
        g = torch.Generator().manual_seed(derive_seed(fit.seed, "attack", r))
        order = chosen[torch.randperm(len(chosen), generator=g)]
        batches = order.split(fit.batch_size)
        for idx in progress_bar(batches, desc=f"round {r + 1} pgd", unit="batch", leave=False,
                                disable=not fit.progress):
            x, y = fit.x(idx, R), fit.y(idx)
            eta = min_min_attack(fit.model, x, y, delta[y], eps, fit.step_size, fit.pgd_steps)
            sums = torch.zeros_like(delta).index_add_(0, y, eta)
            counts = torch.bincount(y, minlength=K)
            present = counts > 0
            delta[present] = (sums[present] / counts[present].view(-1, 1, 1, 1)).clamp_(-eps, eps)
        correct, loss = 0, 0.0
        for idx in chosen.split(fit.batch_size):
            y = fit.y(idx)
            c, s = evaluate(fit.model, torch.clamp(fit.x(idx, R) + delta[y], 0, 1), y)
            correct, loss = correct + c, loss + s
        return correct / len(chosen), loss / len(chosen)

    state = fit.loop(state, one_round, lambda: {"deltas": delta})
    return state, delta.float().cpu().contiguous()


def samplewise_rounds(fit: Fit, state: dict[str, Any], masker: MaskProvider | None) -> tuple[dict[str, Any], np.memmap]:
    """The sample-wise loop (module docstring), with an optional mask (SALM); returns the final state
    and the memmap of the final noise."""
    store = fit.store
    fresh = state["round"] == 0  # a new fit starts from zero noise, whatever an old run left
    states = [store.array(fit.directory / f"state-{i}.f32", np.float32, fresh=fresh and i == 0) for i in (0, 1)]
    once = masker is not None and masker.refresh == "once"
    mask_file = store.array(fit.directory / "mask.u8", np.uint8, planes=True) if once else None
    runs = store.runs(fit.batch_size)

    def one_round(r: int) -> tuple[float, float]:
        current, new = states[r % 2], states[(r + 1) % 2]
        fit.train(lambda idx: torch.clamp(fit.x(idx) + store.read(current, idx).to(fit.device), 0, 1))
        correct, loss = 0, 0.0
        for idx in progress_bar(runs, desc=f"round {r + 1} pgd", unit="batch", leave=False, disable=not fit.progress):
            x, y = fit.x(idx), fit.y(idx)
            delta = store.read(current, idx).to(fit.device)
            mask = None
            if masker is not None:
                if mask_file is None or r == 0:
                    mask = masker(fit.model, x, y, [store.keys[i] for i in idx.tolist()], r)
                    if mask_file is not None:
                        store.write(mask_file, idx, mask.to(torch.uint8), planes=True)
                else:
                    mask = store.read(mask_file, idx, planes=True).to(fit.device).float()
                delta = delta * mask
            delta = min_min_attack(fit.model, x, y, delta, fit.eps, fit.step_size, fit.pgd_steps, mask)
            store.write(new, idx, delta)
            # the surrogate is frozen during the pass: testing each batch now equals testing after it
            c, s = evaluate(fit.model, torch.clamp(x + delta, 0, 1), y)
            correct, loss = correct + c, loss + s
        new.flush()
        if mask_file is not None:
            mask_file.flush()
        return correct / len(store), loss / len(store)

    state = fit.loop(state, one_round, dict)
    return state, states[state["current"]]
