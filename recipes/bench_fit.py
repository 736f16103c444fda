"""Benchmark of the EM fit (`ue_datasets.fit.em.fit_em`) against a loop with the reference's structure,
and of the noise bank's lookup (`recipes/bench_bank.py`).

    python recipes/bench_fit.py [--quick] [--modes classwise,samplewise] [--rounds 2] [--repeats 3]
                                [--bank-entries 1000000] [--skip-bank] [--root /usr/share/datasets/fashion-mnist]

Part 1, fit time. For each mode (class-wise, sample-wise) the same fit runs two ways, alternating
(library first in even repeats, reference-structured loop first in odd ones), ``--repeats`` times;
the figures are medians, the ratio the median of the per-repeat ratios library/reference:

* library: the whole ``fit_em`` call, what a user waits for. It streams the shards once into an
  on-disk sample store (the "first pass": decoding the PNGs, checksums, part files), keeps the
  sample-wise noise in memmaps, writes a checkpoint after every round and, sample-wise, writes the
  noise bank at the end. The first pass is also timed on its own in every repeat (`build_store` on
  the same shards), so "library without the first pass" = whole call - first pass.
* reference-structured loop (written below, ``reference_classwise`` / ``reference_samplewise``): the
  structure of ``HanxunH/Unlearnable-Examples`` (``methods.md`` §3.1-3.4; ``perturbation.py``,
  ``toolbox.py``): the images already decoded in memory as one tensor, the noise in memory as one
  tensor, no store, no checkpoints, no bank; per batch a PGD with a Python step loop
  (``PerturbationTool.min_min_attack``, which returns the noise only eps-clipped); class-wise a Python
  loop over the classes present to average the noise (``for c in classes: noise[c] = mean(eta[y == c])``);
  the stop test a separate pass. Decoding the data into memory is not timed (the reference reads
  CIFAR's pickled arrays). The real reference also adds the noise to each image in a per-sample
  Python loop (numpy masks); this loop indexes the noise tensor instead, so it is, if anything,
  faster than the reference's own code.

Both use the same surrogate (``build_surrogate("small-cnn", ...)`` after ``torch.manual_seed(seed)``),
the same SGD (lr 0.1, momentum 0.9, weight decay 5e-4, gradient norm clipped to 5), the same
settings (eps 8/255, step 0.8/255, ``--train-steps`` 10, ``--batch`` 512, ``--rounds`` fixed: the
library's stop test is set to 1.0 so it never stops early) and the same data: a class-balanced subset
of the real Fashion-MNIST training set (``recipes/fashion_mnist.py``), written as webdataset shards for
the library and held as a tensor for the loop. So that the results can be compared, the loop consumes
the library's seeded batch order (training batches, class-wise subset and its per-round shuffle;
the reference's DataLoader would shuffle otherwise and drop the last batch) and, like the library,
clamps ``x + noise`` to [0, 1] in the SGD steps and the stop test (the reference does not: its bug 3).

Agreement (first repeat; every repeat is also checked bit-identical to the first):

* class-wise: max abs difference of the deltas (library ``tensors["deltas"]`` against the loop's
  noise);
* sample-wise: the library's int8 levels (``protection.bank.find(keys, checksums)`` / ``.levels(rows)``)
  against ``floor(255 * delta + 0.5)`` of the loop's noise, both as the loop holds it (eta) and in
  range (``clamp(x + eta, 0, 1) - x``, what the library stores);
* the surrogate's accuracy on the noisy images after each round (the stop test), side by side.

Where the results differ, ``--diagnose`` reruns the loop (untimed) with the library's conventions one
at a time: (a) the reference returns eta only eps-clipped, so ``x + eta`` may leave [0, 1] (on
Fashion-MNIST's black background eta goes negative), the library the in-range
``clamp(x + eta, 0, 1) - x``: the images the surrogate sees are the same, but class-wise the mean
over a class's samples is not (loop with in-range eta, class-wise); (b) rounding: the reference
steps the image and subtracts ``x`` again, the library steps the noise, so the images can differ in
the last bit, which flips the sign of some near-zero input gradients and then grows through the
surrogate's training (loop with the library's `ue_datasets.fit.pgd.min_min_attack` as its
per-batch attack); (c) class-wise, the summation order of the mean (a Python loop of
``eta[y == c].mean(0)`` against the library's ``index_add_``; loop with both). When a run matches
the library bit for bit, the rest of the loop computes exactly what the library computes.

Part 2, bank lookup: ``recipes/bench_bank.py`` (open cost, lookup per sample against decoding the
image) on a ``--bank-entries`` bank, run in this process via its ``main``.

The defaults (2000 images class-wise, 600 sample-wise with 5 PGD steps instead of the reference's 20,
2 rounds, 3 repeats; a 1M-entry bank) should take about 5 minutes on 2 idle CPU cores (estimated from
runs on cores shared with another job, about twice as slow); ``--quick`` (a smoke run with smaller
settings, printed; its few-second fits make its ratios noisy) about a minute. Everything runs on the CPU; temporary
files are removed at the end.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ue_datasets.fit.em import fit_em
from ue_datasets.fit.pgd import min_min_attack as library_min_min_attack
from ue_datasets.fit.store import build_store, derive_seed
from ue_datasets.fit.surrogates import build_surrogate
from ue_datasets.kernels.samples import pixel_checksum

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bank  # noqa: E402  (recipes/bench_bank.py, beside this script)
from fashion_mnist import DEFAULT_ROOT, balanced, load, write_shards  # noqa: E402

CPU = torch.device("cpu")
LR, MOMENTUM, WEIGHT_DECAY, CLIP_NORM = 0.1, 0.9, 5e-4, 5.0  # the reference's (and the library's) SGD
SURROGATE = "small-cnn"

#: Defaults, and what --quick uses instead (a smoke run: smaller data, batches and step counts).
DEFAULTS = {"rounds": 2, "repeats": 3, "class_per_class": 200, "sample_per_class": 60, "class_pgd_steps": 1,
            "sample_pgd_steps": 5, "train_steps": 10, "batch": 512, "bank_entries": 1_000_000}
QUICK = {"rounds": 2, "repeats": 2, "class_per_class": 20, "sample_per_class": 20, "class_pgd_steps": 1,
         "sample_pgd_steps": 2, "train_steps": 3, "batch": 128, "bank_entries": 100_000}


@dataclass
class Setup:
    """One mode's fit: data and settings shared by both variants."""

    mode: str
    shards: str  # folder of webdataset shards (the library's input)
    pixels: torch.Tensor  # uint8 (N, 1, 28, 28), source order
    x: torch.Tensor  # float (N, 1, 28, 28) in [0, 1], as the library computes it from the pixels
    y: torch.Tensor  # int64 (N,)
    keys: list[str]
    eps: float
    step: float
    pgd_steps: int
    train_steps: int
    rounds: int
    batch: int
    subset: float
    seed: int


# ---------------------------------------------------------------------------------------------------
# The order of the library's batches, restated so that the reference-structured loop consumes the
# same samples in the same order (the reference's own DataLoader shuffles differently, and its
# class-wise loaders drop the last batch). Same arithmetic as `SampleStore.epoch_batches`,
# `SampleStore.stratified` and the per-round attack shuffle of `ue_datasets.fit.em._classwise`, for
# images of one shape.


def library_train_batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """The persistent training iterator: per epoch a seeded permutation cut into batches (a last batch
    of one sample joins the one before it), the batches in a seeded random order; epoch after epoch."""
    stream_seed = derive_seed(seed, "train")
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(derive_seed(stream_seed, epoch))
        chunks = list(torch.randperm(n, generator=g).split(batch))
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        for i in torch.randperm(len(chunks), generator=g).tolist():
            yield chunks[i]
        epoch += 1


def library_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """The seeded stratified class-wise subset, in source order."""
    g = torch.Generator().manual_seed(derive_seed(seed, "subset"))
    picked = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        take = max(1, round(fraction * len(members)))
        picked.append(members[torch.randperm(len(members), generator=g)[:take]])
    return torch.sort(torch.cat(picked)).values


def library_attack_order(subset: torch.Tensor, seed: int, round_index: int) -> torch.Tensor:
    """The subset reshuffled for the PGD pass of round ``round_index``."""
    g = torch.Generator().manual_seed(derive_seed(seed, "attack", round_index))
    return subset[torch.randperm(len(subset), generator=g)]


# ---------------------------------------------------------------------------------------------------
# The reference's structure (HanxunH/Unlearnable-Examples @ f347155, methods.md §3.1-3.4), restated:
# everything in memory, a Python loop over PGD steps per batch, a Python loop over classes to average.


def reference_min_min_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
                             eps: float, step: float, steps: int, in_range: bool = False) -> torch.Tensor:
    """``PerturbationTool.min_min_attack`` (toolbox.py): x_adv = clamp(x + start, 0, 1); each step
    x_adv -= step * sign(dCE/dx_adv), eta = clamp(x_adv - x, -eps, eps), x_adv = clamp(x + eta, 0, 1).
    Returns eta, only eps-clipped (x + eta may leave [0, 1]). The model is already in eval mode with
    its parameters frozen (the caller does it, as perturbation.py does).

    ``in_range`` (diagnosis only, not the reference): return ``x_adv - x`` instead, the noise as the
    library's `ue_datasets.fit.pgd.min_min_attack` returns it (the same values up to rounding: the
    library steps the noise, ``clamp(delta - step * sign, -eps, eps)``, then ``clamp(x + delta, 0, 1) - x``;
    the reference steps the image and subtracts ``x`` again).
    """
    x_adv = torch.clamp(images + start, 0, 1)
    eta = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), labels)
        loss.backward()
        with torch.no_grad():
            x_adv = x_adv - step * x_adv.grad.sign()
            eta = torch.clamp(x_adv - images, -eps, eps)
            x_adv = torch.clamp(images + eta, 0, 1)
    return (x_adv - images if in_range else eta).detach()


def library_arithmetic_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
                              eps: float, step: float, steps: int) -> torch.Tensor:
    """Diagnosis only: the library's own PGD (`ue_datasets.fit.pgd.min_min_attack`) as the loop's
    per-batch attack, to show that the rest of the loop computes what the library computes."""
    return library_min_min_attack(model, images, labels, start, eps, step, steps)


Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, float, float, int], torch.Tensor]
IN_RANGE: Attack = partial(reference_min_min_attack, in_range=True)


def reference_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """``trainer.train_batch``: one SGD step on CE, the gradient norm clipped."""
    model.train()
    for p in model.parameters():
        p.requires_grad = True
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()


def reference_freeze(model: nn.Module) -> None:
    """Before the PGD pass, as perturbation.py: eval mode, ``requires_grad = False``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad = False


def reference_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """The stop test: accuracy on the noisy images, in eval mode, batch after batch."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for a in range(0, len(y), batch):
            correct += int((model(x[a:a + batch]).argmax(1) == y[a:a + batch]).sum())
    return correct / len(y)


def reference_surrogate(s: Setup, num_classes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The library's surrogate, built from the same seed."""
    torch.manual_seed(s.seed)
    model = build_surrogate(SURROGATE, num_classes, s.x.shape[1], s.x.shape[-1], CPU)
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def reference_classwise(s: Setup, attack: Attack = reference_min_min_attack,
                        library_mean: bool = False) -> tuple[torch.Tensor, list[float]]:
    """``universal_perturbation`` (class-wise, ``--use_subset``): returns the noise (K, C, H, W) and
    the accuracy after each round. For the diagnosis only: ``attack``, another per-batch PGD;
    ``library_mean``, average as `ue_datasets.fit.em._classwise` does (``index_add_`` sums / counts)."""
    K = int(s.y.max()) + 1
    model, optimizer = reference_surrogate(s, K)
    noise = torch.zeros(K, *s.x.shape[1:])  # the whole noise, in memory
    batches = library_train_batches(len(s.y), s.batch, s.seed)
    subset = library_subset(s.y, s.subset, s.seed)
    accuracy = []
    for r in range(s.rounds):
        for _ in range(s.train_steps):
            idx = next(batches)
            reference_train_step(model, optimizer, torch.clamp(s.x[idx] + noise[s.y[idx]], 0, 1), s.y[idx])
        reference_freeze(model)
        for idx in library_attack_order(subset, s.seed, r).split(s.batch):
            images, labels = s.x[idx], s.y[idx]
            eta = attack(model, images, labels, noise[labels], s.eps, s.step, s.pgd_steps)
            if library_mean:
                sums = torch.zeros_like(noise).index_add_(0, labels, eta)
                counts = torch.bincount(labels, minlength=K)
                present = counts > 0
                noise[present] = (sums[present] / counts[present].view(-1, 1, 1, 1)).clamp_(-s.eps, s.eps)
                continue
            for c in torch.unique(labels).tolist():  # per class present: the mean of its samples' eta
                noise[c] = torch.clamp(eta[labels == c].mean(0), -s.eps, s.eps)
        accuracy.append(reference_accuracy(model, torch.clamp(s.x[subset] + noise[s.y[subset]], 0, 1), s.y[subset],
                                           s.batch))
    return noise, accuracy


def reference_samplewise(s: Setup, attack: Attack = reference_min_min_attack) -> tuple[torch.Tensor, list[float]]:
    """``sample_wise_perturbation``: returns the noise (N, C, H, W) and the accuracy after each round.
    ``attack``: the per-batch PGD (another one for the diagnosis only)."""
    model, optimizer = reference_surrogate(s, int(s.y.max()) + 1)
    noise = torch.zeros_like(s.x)  # the whole noise, in memory
    batches = library_train_batches(len(s.y), s.batch, s.seed)
    accuracy = []
    for _ in range(s.rounds):
        for _ in range(s.train_steps):
            idx = next(batches)
            reference_train_step(model, optimizer, torch.clamp(s.x[idx] + noise[idx], 0, 1), s.y[idx])
        reference_freeze(model)
        for a in range(0, len(s.y), s.batch):  # every batch, in the fixed (source) order
            b = a + s.batch
            noise[a:b] = attack(model, s.x[a:b], s.y[a:b], noise[a:b], s.eps, s.step, s.pgd_steps)
        accuracy.append(reference_accuracy(model, torch.clamp(s.x + noise, 0, 1), s.y, s.batch))
    return noise, accuracy


# ---------------------------------------------------------------------------------------------------
# The library


def library_fit(s: Setup, bank_dir: Path):
    """The whole ``fit_em`` call; its temporary cache is removed by the call itself."""
    return fit_em(s.shards, mode=s.mode, surrogate=SURROGATE, device="cpu", seed=s.seed, eps=s.eps,
                  step_size=s.step, pgd_steps=s.pgd_steps, train_steps=s.train_steps, stop_accuracy=1.0,
                  max_rounds=s.rounds, batch_size=s.batch, lr=LR, subset=s.subset,
                  bank_dir=bank_dir if s.mode == "samplewise" else None, progress=False)


def library_levels(protection, s: Setup) -> torch.Tensor:
    """int8 ``(N, C, H, W)``: each sample's levels in the sample-wise protection's bank, found by key
    and pixel checksum."""
    rows = protection.bank.find(s.keys, pixel_checksum(s.pixels))
    if (rows < 0).any():
        raise SystemExit(f"{int((rows < 0).sum())} samples have no entry in the library's bank")
    return torch.stack(protection.bank.levels(rows))


def quantise(delta: torch.Tensor) -> torch.Tensor:
    """``floor(255 * delta + 0.5)`` as int16 (the library's default rounding)."""
    return torch.floor(delta * 255 + 0.5).to(torch.int16)


# ---------------------------------------------------------------------------------------------------


def make_setup(mode: str, images: np.ndarray, labels: np.ndarray, per_class: int, folder: Path,
               args: argparse.Namespace) -> Setup:
    index = balanced(labels, per_class)
    write_shards(images, labels, index, folder, "train")
    pixels = torch.from_numpy(images[index].copy())[:, None]
    return Setup(mode=mode, shards=str(folder), pixels=pixels, x=pixels.float().div_(255),
                 y=torch.from_numpy(labels[index].astype(np.int64)), keys=[f"train-{i:05d}" for i in index],
                 eps=8 / 255, step=0.8 / 255,
                 pgd_steps=args.class_pgd_steps if mode == "classwise" else args.sample_pgd_steps,
                 train_steps=args.train_steps, rounds=args.rounds, batch=args.batch, subset=0.2, seed=args.seed)


def fmt(values: list[float], digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def bench_mode(s: Setup, repeats: int, tmp: Path, diagnosis: bool) -> None:
    n = len(s.y)
    what = (f"{n} images, subset {s.subset} ({len(library_subset(s.y, s.subset, s.seed))}), "
            if s.mode == "classwise" else f"{n} images, ")
    print(f"\n== EM {s.mode}: {what}eps 8/255, step 0.8/255, pgd steps {s.pgd_steps}, train steps "
          f"{s.train_steps}, batch {s.batch}, {s.rounds} rounds (no early stop), surrogate {SURROGATE}, seed "
          f"{s.seed}; {repeats} repeats, alternating", flush=True)

    def run_library(r: int) -> tuple[float, object]:
        t0 = time.perf_counter()
        p = library_fit(s, tmp / f"bank-{s.mode}-{r}")
        return time.perf_counter() - t0, p

    def run_reference(r: int) -> tuple[float, object]:
        t0 = time.perf_counter()
        out = reference_classwise(s) if s.mode == "classwise" else reference_samplewise(s)
        return time.perf_counter() - t0, out

    def run_store(r: int) -> tuple[float, object]:
        t0 = time.perf_counter()
        store = build_store(s.shards, tmp / f"store-{s.mode}-{r}", progress=False)
        seconds = time.perf_counter() - t0
        shutil.rmtree(store.directory, ignore_errors=True)
        return seconds, len(store)

    # warm-up, untimed: the first fit of a process pays one-time costs (imports, the decoding pool)
    fit_em(s.shards, mode=s.mode, surrogate=SURROGATE, device="cpu", seed=s.seed, pgd_steps=1, train_steps=1,
           max_rounds=1, batch_size=s.batch, limit=min(n, s.batch), bank_dir=tmp / f"bank-{s.mode}-warm-up",
           progress=False)
    contenders = {"library": run_library, "reference": run_reference, "store": run_store}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    lib_first = ref_first = None
    lib_same = ref_same = True
    for r in range(repeats):
        order = list(contenders) if r % 2 == 0 else ["reference", "library", "store"]
        results = {}
        for name in order:
            seconds, results[name] = contenders[name](r)
            times[name].append(seconds)
        p = results["library"]
        if p.params["rounds"] != s.rounds:
            print(f"   warning: the library stopped after {p.params['rounds']} rounds ({p.params['stopped']})")
        lib_result = p.tensors["deltas"] if s.mode == "classwise" else library_levels(p, s)
        ref_noise, ref_acc = results["reference"]
        if r == 0:
            lib_first, ref_first = lib_result, (ref_noise, ref_acc)
            lib_acc, protection = p.params["accuracy_history"], p
        else:
            lib_same &= torch.equal(lib_result, lib_first)
            ref_same &= torch.equal(ref_noise, ref_first[0])
        if s.mode == "samplewise" and r > 0:
            shutil.rmtree(p.bank.directory, ignore_errors=True)
        print(f"   repeat {r + 1}: library {times['library'][-1]:7.2f} s, reference {times['reference'][-1]:7.2f} s, "
              f"first pass {times['store'][-1]:5.2f} s", flush=True)

    lib, ref, store = (statistics.median(times[k]) for k in ("library", "reference", "store"))
    ratio = statistics.median(a / b for a, b in zip(times["library"], times["reference"]))
    ratio_rounds = statistics.median((a - c) / b for a, b, c in zip(times["library"], times["reference"],
                                                                     times["store"]))
    print(f"   library fit_em, whole call        {lib:8.2f} s   (median of {repeats})")
    print(f"     of which the first pass         {store:8.2f} s   (build_store alone on the same shards: "
          f"{100 * store / lib:.1f} % of the call)")
    print(f"   reference-structured loop         {ref:8.2f} s")
    print(f"   ratio library/reference           {ratio:8.3f}   (without the first pass {ratio_rounds:.3f})")

    ref_noise, ref_acc = ref_first
    print(f"   agreement (repeat 1; repeats bit-identical to it: library {'yes' if lib_same else 'NO'}, "
          f"reference {'yes' if ref_same else 'NO'}):")
    print(f"     surrogate accuracy per round      library   {fmt(lib_acc)}")
    print(f"                                       reference {fmt(ref_acc)}")
    # diagnosis (--diagnose), untimed: the same loop changed step by step towards the library's arithmetic
    if not diagnosis:
        print("     (--diagnose reruns the loop with the library's conventions: where differences come from)")
    if s.mode == "classwise":
        def show(name: str, noise: torch.Tensor) -> None:
            d = (lib_first - noise).abs()
            print(f"     deltas, max |library - {name}| {float(d.max()):.3e} = {255 * float(d.max()):.4f}/255 "
                  f"(mean {255 * float(d.mean()):.4f}/255; eps 8/255)")
        show("loop", ref_noise)
        variants = {"(a) in-range eta": (IN_RANGE, False),
                    "(b) library PGD (in-range, its rounding)": (library_arithmetic_attack, False),
                    "(c) (b) + library averaging": (library_arithmetic_attack, True)}
        for name, (attack, library_mean) in (variants.items() if diagnosis else ()):
            noise, acc = reference_classwise(s, attack, library_mean)
            show(f"loop {name}", noise)
            print(f"       its accuracy per round {fmt(acc)}")
    else:
        lv = lib_first.to(torch.int16)
        total = lv.numel()

        def show(name: str, delta: torch.Tensor) -> None:
            d = (lv - quantise(delta)).abs()
            print(f"     bank levels vs floor(255 * delta + 0.5), delta {name}: {int((d > 0).sum())} of {total} "
                  f"differ ({100 * float((d > 0).sum()) / total:.3f} %), max |diff| {int(d.max())}")
        show("= loop's eta", ref_noise)
        show("= loop's clamp(x + eta, 0, 1) - x", torch.clamp(s.x + ref_noise, 0, 1) - s.x)
        outside = ((s.x + ref_noise) < 0) | ((s.x + ref_noise) > 1)
        print(f"       pixels where the loop's x + eta leaves [0, 1]: {int(outside.sum())} "
              f"({100 * float(outside.float().mean()):.2f} %)")
        if diagnosis:
            noise, acc = reference_samplewise(s, library_arithmetic_attack)
            show("= loop (b) library PGD (in-range, its rounding)", noise)
            print(f"       its accuracy per round {fmt(acc)}")
        shutil.rmtree(protection.bank.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="a smoke run (< 1 minute): " + ", ".join(f"{k} {v}" for k, v in
                                                                                       QUICK.items()))
    add("--modes", default="classwise,samplewise", help="comma list of EM modes to time (default both)")
    add("--rounds", type=int, help=f"EM rounds, fixed, no early stop (default {DEFAULTS['rounds']})")
    add("--repeats", type=int, help=f"alternating timed repeats per mode (default {DEFAULTS['repeats']})")
    add("--class-per-class", type=int, help="class-wise: Fashion-MNIST training images per class "
        f"(default {DEFAULTS['class_per_class']}; the PGD pass and stop test use a 20 %% subset)")
    add("--sample-per-class", type=int, help=f"sample-wise: images per class (default {DEFAULTS['sample_per_class']})")
    add("--class-pgd-steps", type=int, help=f"class-wise PGD steps (default {DEFAULTS['class_pgd_steps']}, the "
        "reference's)")
    add("--sample-pgd-steps", type=int, help=f"sample-wise PGD steps (default {DEFAULTS['sample_pgd_steps']}; the "
        "reference uses 20, fewer here for time)")
    add("--train-steps", type=int, help=f"SGD steps per round (default {DEFAULTS['train_steps']}, the reference's)")
    add("--batch", type=int, help=f"batch size (default {DEFAULTS['batch']}, the reference's)")
    add("--seed", type=int, default=0, help="seeds the surrogate and the library's shuffles (default 0)")
    add("--diagnose", action="store_true",
        help="after the timing, untimed reruns of the loop with the library's conventions one by one (in-range eta, "
        "the library's PGD, class-wise its averaging): where differences come from; 1-3 more loop runs per mode")
    add("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    add("--root", default=str(DEFAULT_ROOT), help="folder of the Fashion-MNIST IDX files")
    add("--skip-fit", action="store_true", help="skip part 1 (fit time)")
    add("--bank-entries", type=int, help=f"entries of bench_bank's large bank (default {DEFAULTS['bank_entries']})")
    add("--skip-bank", action="store_true", help="skip part 2 (bank lookup, recipes/bench_bank.py)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    modes = args.modes.split(",")
    if any(m not in ("classwise", "samplewise") for m in modes):
        p.error("--modes: classwise and/or samplewise")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{platform.machine()}, torch threads {torch.get_num_threads()}{', --quick' if args.quick else ''}")

    if not args.skip_fit:
        images, labels = load("train", args.root)
        tmp = Path(tempfile.mkdtemp(prefix="bench_fit."))
        try:
            # warm-up: the first forward/backward pass of a process is slow
            model = build_surrogate(SURROGATE, 10, 1, 28, CPU)
            warm = torch.rand(args.batch, 1, 28, 28)
            F.cross_entropy(model(warm), torch.zeros(args.batch, dtype=torch.int64)).backward()
            print(f"Part 1: EM fit time on real Fashion-MNIST ({args.root}), CPU")
            for mode in modes:
                per_class = args.class_per_class if mode == "classwise" else args.sample_per_class
                s = make_setup(mode, images, labels, per_class, tmp / f"shards-{mode}", args)
                bench_mode(s, args.repeats, tmp, diagnosis=args.diagnose)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if not args.skip_bank:
        print(f"\nPart 2: noise bank lookup (recipes/bench_bank.py, --entries {args.bank_entries})", flush=True)
        bank_args = ["--entries", str(args.bank_entries), "--small", str(min(10_000, args.bank_entries)),
                     "--root", args.root]
        if args.quick:
            bank_args += ["--repeats", "3", "--opens", "50", "--batches", "20"]
        bench_bank.main(bank_args)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
