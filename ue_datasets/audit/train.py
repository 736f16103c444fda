"""Train a classifier from scratch on (protected) images and record its clean test accuracy per epoch.

This is the measurement behind every effectiveness audit: a protection works when a model trained on
the protected training set does badly on the clean test set. The recipe follows the CUDA evaluation
script where it can on CPU (SGD with momentum 0.9 and weight decay 5e-4, cross-entropy, gradient-norm
clipping at 5, no input normalisation, clean test accuracy after every epoch) with a cosine learning
rate over all iterations instead of the script's step schedule. Both the **peak** and the **final**
test accuracy are reported: poisons are typically learned late, so early stopping is a defence.

Defences that live in the training loop are here too:

- ``augment``: random crop with zero padding ``max(1, min(H, W) // 8)`` (4 at 32x32) + horizontal flip;
- ``adversarial_eps``: Madry PGD L-inf adversarial training (`pgd_attack`);
- `linear_probe_ssl`: the label-agnostic attacker's unsupervised route, SimCLR pre-training without
  labels and a linear probe on the frozen features.

Everything is seeded: ``torch.manual_seed(seed)`` semantics for initialisation and a dedicated
`torch.Generator` for shuffling, augmentation and PGD's random start, so on CPU the same inputs and
config give the same accuracies. Global state (the RNGs, deterministic-algorithm flags) is restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UEDatasetsError
from ..progress import progress_bar
from .defenses import augment_pad, random_crop_flip
from .models import SmallCNN, build_model

#: Offset between the initialisation seed and the seed of the data generator (shuffle, augmentation).
_DATA_SEED_OFFSET = 0x5EED
#: SimCLR pre-training epochs of `linear_probe_ssl` (the audit's ``--probe``).
SSL_EPOCHS = 10


@dataclass(frozen=True)
class TrainConfig:
    """How to train an audit classifier.

    Attributes:
        epochs: passes over the training set (>= 1).
        batch_size: training batch size; the evaluation uses batches of ``2 * batch_size``.
        lr: peak SGD learning rate, annealed to 0 with a cosine over all iterations.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2), applied to every parameter.
        seed: seeds the initialisation and the data generator.
        augment: random crop (zero padding ``max(1, min(H, W) // 8)``) + horizontal flip per batch.
        adversarial_eps: PGD L-inf adversarial training with this radius in ``[0, 1]`` pixel units
            (4/255 and 8/255 are the usual audits); ``None`` trains normally.
        pgd_steps: PGD steps per batch.
        pgd_step: PGD step size; ``None`` means ``adversarial_eps / 4``.
        grad_clip: maximum gradient L2 norm; 0 or ``None`` disables clipping.
        device: torch device to train on (``cpu``, ``cuda``, ``cuda:1``).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = False
    adversarial_eps: float | None = None
    pgd_steps: int = 10
    pgd_step: float | None = None
    grad_clip: float | None = 5.0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "pgd_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UEDatasetsError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UEDatasetsError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UEDatasetsError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UEDatasetsError(
                f"TrainConfig needs 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum!r}, {self.weight_decay!r}"
            )
        if self.adversarial_eps is not None and not 0 < self.adversarial_eps <= 1:
            raise UEDatasetsError(
                f"TrainConfig.adversarial_eps must lie in (0, 1] (pixel units; 8/255 = {8 / 255:.4f}) or be None, "
                f"got {self.adversarial_eps!r}"
            )
        if self.pgd_step is not None and not self.pgd_step > 0:
            raise UEDatasetsError(f"TrainConfig.pgd_step must be positive or None, got {self.pgd_step!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise UEDatasetsError(f"TrainConfig.grad_clip must be >= 0 or None, got {self.grad_clip!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise UEDatasetsError(f"TrainConfig.device: {exc}") from exc

    @property
    def effective_pgd_step(self) -> float | None:
        """The PGD step size used: ``pgd_step`` or ``adversarial_eps / 4`` (None without AT)."""
        if self.adversarial_eps is None:
            return None
        return self.pgd_step if self.pgd_step is not None else self.adversarial_eps / 4


@dataclass
class TrainResult:
    """Accuracies of one training run; all accuracies are fractions in ``[0, 1]``.

    Attributes:
        test_accuracy: clean test accuracy after every epoch (``epochs`` entries).
        train_accuracy: accuracy on the training batches as trained (augmented / adversarial, model
            in training mode) during each epoch.
        train_loss: mean cross-entropy over each epoch's training batches.
        peak: the best test accuracy; ``peak_epoch`` (1-based) is the first epoch that reached it.
        final: the last epoch's test accuracy.
        seconds: wall-clock time of the whole run (for `linear_probe_ssl`, pre-training included).
        pretrain_loss: `linear_probe_ssl` only: mean NT-Xent loss per pre-training epoch.
    """

    test_accuracy: list[float]
    train_accuracy: list[float]
    train_loss: list[float]
    peak: float
    peak_epoch: int
    final: float
    seconds: float
    pretrain_loss: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- global state


@contextlib.contextmanager
def _seeded(config: TrainConfig):
    """Seed the global RNG of CPU (and of ``config.device`` if CUDA) with ``config.seed`` and enable
    deterministic algorithms; restore the RNG states and flags on exit."""
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UEDatasetsError(f"TrainConfig.device is {config.device!r} but CUDA is not available")
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(config.seed)
        if cuda:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(config.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


def _data_generator(seed: int) -> torch.Generator:
    """The dedicated CPU generator for shuffling, augmentation and PGD starts."""
    return torch.Generator().manual_seed(seed + _DATA_SEED_OFFSET)


# --------------------------------------------------------------------------- input checks


def _check_split(x: Tensor, y: Tensor, name: str, num_classes: int, images: bool) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UEDatasetsError(f"{name}: images and labels must be torch tensors")
    if images and (x.ndim != 4 or x.dtype not in (torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)):
        raise UEDatasetsError(f"{name}_x must be uint8 (or float in [0, 1]) (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if x.ndim < 2 or len(x) == 0:
        raise UEDatasetsError(f"{name}_x must hold at least one sample, got shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise UEDatasetsError(f"{name}_y must be integer labels (N,) with N = {len(x)}, got {y.dtype} {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise UEDatasetsError(f"{name}_y has labels outside [0, {num_classes}): min {int(y.min())}, max {int(y.max())}")


def _check_inputs(train_x, train_y, test_x, test_y, num_classes, images: bool) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UEDatasetsError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    _check_split(train_x, train_y, "train", num_classes, images)
    _check_split(test_x, test_y, "test", num_classes, images)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UEDatasetsError(f"train and test samples differ in shape: {tuple(train_x.shape[1:])} vs {tuple(test_x.shape[1:])}")


def _to_float(x: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``; float input is taken as already in ``[0, 1]``. Images
    ``(B, C, H, W)`` come back channels-last (2-3x faster convolutions on CPU; same values)."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled split of ``range(n)``; a final batch of one sample (BatchNorm cannot train on it) is
    merged into the previous batch."""
    chunks = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def _num_batches(n: int, batch_size: int) -> int:
    """``len(_batches(n, batch_size, ...))`` without drawing a permutation."""
    k = -(-n // batch_size)
    return k - 1 if k > 1 and n % batch_size == 1 else k


# --------------------------------------------------------------------------- augmentation and PGD


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 10, step: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Madry et al.'s PGD L-inf attack: maximise the cross-entropy within ``||delta||_inf <= eps``.

    Random start ``delta ~ U(-eps, eps)``, then ``steps`` signed-gradient ascent steps of size ``step``,
    each followed by projection onto the eps-ball around ``x`` and clamping to ``[0, 1]``. The model is
    put in eval mode while crafting (BatchNorm uses its running statistics and is not updated, as in
    APBench's ``madrys.py``) and returned to its previous mode; parameter gradients are not touched.

    Args:
        model: classifier taking float ``(B, C, H, W)`` in ``[0, 1]``.
        x: float images ``(B, C, H, W)`` in ``[0, 1]``, on the model's device.
        y: int64 labels ``(B,)``.
        eps: radius in ``[0, 1]`` pixel units (8/255 = 0.0314).
        steps: number of ascent steps (0 returns the random start).
        step: step size; ``None`` means ``eps / 4``.
        generator: CPU generator for the random start (the global RNG when None).

    Returns:
        Detached float ``(B, C, H, W)`` adversarial images with ``|x_adv - x| <= eps`` and values in
        ``[0, 1]``.
    """
    if not eps >= 0:
        raise UEDatasetsError(f"PGD eps must be >= 0, got {eps!r}")
    step = eps / 4 if step is None else step
    x = x.detach()
    noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    x_adv = (x + (noise * 2 - 1) * eps).clamp_(0, 1)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() + step * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0, 1)
    finally:
        model.train(was_training)
    return x_adv.detach()


# --------------------------------------------------------------------------- training loop


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: str | torch.device = "cpu", batch_size: int = 256) -> float:
    """Accuracy in ``[0, 1]`` of ``model`` (eval mode, no grad, batched) on samples ``x`` (uint8 images,
    or float in ``[0, 1]`` / float features) with int labels ``y``; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(x), batch_size):
            xb = _to_float(x[start:start + batch_size].to(device))
            yb = y[start:start + batch_size].to(device)
            correct += int((model(xb).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


def _result(test_acc: list[float], train_acc: list[float], train_loss: list[float], seconds: float, **extra) -> TrainResult:
    peak = max(test_acc)
    return TrainResult(test_accuracy=test_acc, train_accuracy=train_acc, train_loss=train_loss, peak=peak,
                       peak_epoch=test_acc.index(peak) + 1, final=test_acc[-1], seconds=seconds, **extra)


def _fit(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, config: TrainConfig,
         progress: str | None, started: float, on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """The loop behind `train_model`, without the seeding and input checks; ``on_epoch(epoch, seconds)``
    is called after each epoch (training and evaluation) with its wall-clock time."""
    device = torch.device(config.device)
    model.to(device).train()
    if train_x.ndim == 4:
        model.to(memory_format=torch.channels_last)
    generator = _data_generator(config.seed)
    train_y, test_y = train_y.long(), test_y.long()
    n = len(train_x)
    iters_per_epoch = _num_batches(n, config.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * iters_per_epoch)
    eps, pgd_step = config.adversarial_eps, config.effective_pgd_step
    test_acc: list[float] = []
    train_acc: list[float] = []
    train_loss: list[float] = []
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress_bar(_batches(n, config.batch_size, generator), desc=f"{progress} {epoch}/{config.epochs}",
                   leave=False, disable=progress is None, unit="batch")
        for idx in bar:
            xb = _to_float(train_x[idx].to(device, non_blocking=True))
            yb = train_y[idx].to(device, non_blocking=True)
            if config.augment:
                pad = max(1, augment_pad(*xb.shape[-2:]))
                xb = random_crop_flip(xb, generator, pad).contiguous(memory_format=torch.channels_last)
            if eps is not None:
                xb = pgd_attack(model, xb, yb, eps, config.pgd_steps, pgd_step, generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise UEDatasetsError(
                    f"training diverged (loss {loss.item()}) in epoch {epoch}; lower TrainConfig.lr (now {config.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", test=f"{test_acc[-1]:.3f}" if test_acc else "-", refresh=False)
        train_loss.append(loss_sum / seen)
        train_acc.append(correct / seen)
        test_acc.append(evaluate(model, test_x, test_y, device, 2 * config.batch_size))
        if on_epoch is not None:
            on_epoch(epoch, time.perf_counter() - epoch_started)
    model.eval()
    return _result(test_acc, train_acc, train_loss, time.perf_counter() - started)


def train_model(model: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                config: TrainConfig, progress: str | None = None) -> TrainResult:
    """Train an already built ``model`` in place (see `train_classifier`); it ends in eval mode on
    ``config.device``. The global RNG is seeded with ``config.seed`` during training (dropout) and
    restored afterwards; the initialisation is the caller's.

    ``train_x`` / ``test_x`` may also be float feature matrices ``(N, D)`` (then ``augment`` and
    ``adversarial_eps`` must be off): this is how linear probes are trained.
    """
    started = time.perf_counter()
    images = train_x.ndim == 4 if isinstance(train_x, Tensor) else True
    _check_inputs(train_x, train_y, test_x, test_y, num_classes, images=images)
    if not images and (config.augment or config.adversarial_eps is not None):
        raise UEDatasetsError("augment and adversarial training need image input (N, C, H, W)")
    with _seeded(config):
        return _fit(model, train_x, train_y, test_x, test_y, config, progress, started)


def train_classifier(model_name: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                     config: TrainConfig, progress: str | None = None,
                     on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model_name`` from scratch on ``train_x`` and report its clean test accuracy per epoch.

    SGD (``lr``, ``momentum``, ``weight_decay``) with a cosine learning rate over all iterations,
    cross-entropy, gradient-norm clipping, optional crop+flip augmentation and PGD adversarial
    training; after every epoch the model is evaluated on the full clean test set. Deterministic on
    CPU for a given seed; the caller's RNG state and deterministic-algorithm flags are restored.

    Args:
        model_name: see `ue_datasets.audit.models.build_model` (``small-cnn``, ``resnet18``, torchvision).
        train_x: uint8 ``(N, C, H, W)`` CPU training images (float in ``[0, 1]`` is accepted too);
            moved to ``config.device`` and scaled to ``[0, 1]`` per batch.
        train_y: int64 ``(N,)`` labels in ``[0, num_classes)``.
        test_x: uint8 ``(M, C, H, W)`` clean test images of the same ``C, H, W``.
        test_y: int64 ``(M,)`` labels.
        num_classes: number of classes (>= 2).
        config: the recipe (`TrainConfig`).
        progress: description for a progress bar per epoch; None shows no bar.
        on_epoch: called as ``on_epoch(epoch, seconds)`` (1-based epoch, its wall-clock time) after
            each epoch's training and evaluation.

    Returns:
        `TrainResult` with per-epoch accuracies, peak, peak epoch and final accuracy.
    """
    started = time.perf_counter()
    _check_inputs(train_x, train_y, test_x, test_y, num_classes, images=True)
    _, c, h, w = train_x.shape
    with _seeded(config):
        model = build_model(model_name, num_classes, c, max(h, w))
        return _fit(model, train_x, train_y, test_x, test_y, config, progress, started, on_epoch)


# --------------------------------------------------------------------------- SimCLR + linear probe


def ssl_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """SimCLR-lite views of float images ``(B, C, H, W)`` in ``[0, 1]``: random resized crop (area
    scale 0.5-1, aspect 3/4-4/3, bilinear) with horizontal flip; brightness and contrast jitter
    (factors 0.6-1.4, probability 0.8); for 3 channels also saturation jitter (0.6-1.4, inside the same
    0.8) and grayscale (probability 0.2). Draws a fixed number of values from ``generator`` per call.
    (Brightness/contrast jitter is kept for one channel too: on Fashion-MNIST, SimCLR with crop and
    flip alone gave a linear probe 7 points worse.)

    Returns float ``(B, C, H, W)`` in ``[0, 1]`` on ``x``'s device.
    """
    b, c, h, w = x.shape
    r = torch.rand(b, 10, generator=generator).to(x.device)
    area = 0.5 + 0.5 * r[:, 0]
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[:, 1]
    sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop width as a fraction of the image
    sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    tx = (1 - sx) * (2 * r[:, 2] - 1)  # centre, normalised coordinates: crop stays inside the image
    ty = (1 - sy) * (2 * r[:, 3] - 1)
    flip = torch.where(r[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = (r[:, 5] < 0.8)[:, None, None, None]
    ones = torch.ones((), device=x.device)
    brightness = torch.where(jitter, (0.6 + 0.8 * r[:, 6])[:, None, None, None], ones)
    contrast = torch.where(jitter, (0.6 + 0.8 * r[:, 7])[:, None, None, None], ones)
    out = (out * brightness).clamp_(0, 1)
    gray = out.mean(1, keepdim=True)
    mean = gray.mean((2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp_(0, 1)
    if c == 3:
        saturation = torch.where(jitter, (0.6 + 0.8 * r[:, 8])[:, None, None, None], ones)
        gray = out.mean(1, keepdim=True)
        out = ((out - gray) * saturation + gray).clamp_(0, 1)
        to_gray = (r[:, 9] < 0.2)[:, None, None, None]
        out = torch.where(to_gray, out.mean(1, keepdim=True).expand_as(out), out)
    return out


def nt_xent(z: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss of projections ``z`` ``(2B, D)``: rows ``i`` and ``i + B`` are the two views
    of one image, every other row is a negative. Returns the mean scalar loss."""
    n = len(z) // 2
    z = F.normalize(z, dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


@torch.no_grad()
def _features(encoder: nn.Module, x: Tensor, device: torch.device, batch_size: int) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(_to_float(x[s:s + batch_size].to(device))).float().cpu() for s in range(0, len(x), batch_size)])


def linear_probe_ssl(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, config: TrainConfig,
                     ssl_epochs: int = SSL_EPOCHS, progress: str | None = None, *, ssl_batch_size: int = 256, ssl_lr: float = 1e-3,
                     temperature: float = 0.5, projection_dim: int = 64) -> TrainResult:
    """The label-agnostic attacker's unsupervised route: SimCLR on the protected images, linear probe.

    1. A small-cnn encoder (`SmallCNN` without its last layer; 64-d features) with a projection head
       ``Linear(64, 128)-ReLU-Linear(128, projection_dim)`` is trained **without labels** for
       ``ssl_epochs`` with NT-Xent (``temperature``) on two `ssl_augment` views per image (Adam,
       ``ssl_lr``, cosine schedule, batches of ``ssl_batch_size``).
    2. The encoder is frozen; the features of the un-augmented ``train_x`` and ``test_x`` (eval mode)
       are standardised with the training features' mean and std.
    3. A linear classifier is trained on those training features with ``train_y`` for ``config.epochs``
       with ``config``'s SGD recipe (``augment`` and ``adversarial_eps`` are ignored), and its clean test
       accuracy is recorded per epoch.

    Args: as `train_classifier` (uint8 ``(N, C, H, W)`` images, int64 labels), plus the SimCLR settings.

    Returns:
        `TrainResult` of the linear probe (``config.epochs`` entries); ``pretrain_loss`` holds the mean
        NT-Xent loss of each pre-training epoch and ``seconds`` covers both stages.
    """
    started = time.perf_counter()
    _check_inputs(train_x, train_y, test_x, test_y, num_classes, images=True)
    if isinstance(ssl_epochs, bool) or not isinstance(ssl_epochs, int) or ssl_epochs < 0:
        raise UEDatasetsError(f"ssl_epochs must be a non-negative integer, got {ssl_epochs!r}")
    if len(train_x) < 2 or ssl_batch_size < 2 or not temperature > 0:
        raise UEDatasetsError("SimCLR needs at least 2 training images, ssl_batch_size >= 2 and temperature > 0")
    device = torch.device(config.device)
    c = train_x.shape[1]
    with _seeded(config):
        encoder = SmallCNN(c, num_classes).features
        head = nn.Sequential(nn.Linear(64, 128), nn.ReLU(inplace=True), nn.Linear(128, projection_dim))
        net = nn.Sequential(encoder, head).to(device).train().to(memory_format=torch.channels_last)
        generator = _data_generator(config.seed)
        n = len(train_x)
        iters = ssl_epochs * _num_batches(n, ssl_batch_size)
        optimizer = torch.optim.Adam(net.parameters(), lr=ssl_lr, weight_decay=1e-6)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iters))
        pretrain_loss: list[float] = []
        for epoch in range(1, ssl_epochs + 1):
            loss_sum, seen = 0.0, 0
            bar = progress_bar(_batches(n, ssl_batch_size, generator), desc=f"{progress} SimCLR {epoch}/{ssl_epochs}",
                       leave=False, disable=progress is None, unit="batch")
            for idx in bar:
                xb = _to_float(train_x[idx].to(device, non_blocking=True))
                views = torch.cat([ssl_augment(xb, generator), ssl_augment(xb, generator)])
                views = views.contiguous(memory_format=torch.channels_last)
                loss = nt_xent(net(views), temperature)
                if not torch.isfinite(loss):
                    raise UEDatasetsError(f"SimCLR pre-training diverged (loss {loss.item()}) in epoch {epoch}; lower ssl_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(idx)
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
            pretrain_loss.append(loss_sum / seen)
        feat_train = _features(encoder, train_x, device, 4 * ssl_batch_size)
        feat_test = _features(encoder, test_x, device, 4 * ssl_batch_size)
        mean, std = feat_train.mean(0), feat_train.std(0, unbiased=False).clamp_min(1e-6)
        feat_train, feat_test = (feat_train - mean) / std, (feat_test - mean) / std
        probe = nn.Linear(feat_train.shape[1], num_classes)
        probe_config = dataclasses.replace(config, augment=False, adversarial_eps=None)
        result = _fit(probe, feat_train, train_y, feat_test, test_y, probe_config,
                      None if progress is None else f"{progress} probe", started)
    result.pretrain_loss = pretrain_loss
    return result
