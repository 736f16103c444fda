"""An estimate, before training, of what each audit setting costs and of the audit's total time.

The unit is one **plain epoch**: a forward and a backward pass of the target model over every image of
the training set. Per epoch a setting costs

- 1 for a classifier under a preprocessing defense (``jpeg``, ``bdr``, ...: applied once before
  training, not counted) or ``augment``;
- ``S + 1`` under ``at:EPS`` (S PGD steps, each one more forward and backward pass; measured 9-10x a
  plain epoch for ``at:8``, small-cnn, CPU);
- plus the evaluation, a forward pass over the test set, about a third of a forward and backward pass
  per image: ``n_test / (3 n_train)``.

``ssl-probe`` costs `SSL_PASSES` per SimCLR epoch (two augmented views; measured about 2.7x a plain
epoch on CPU) for `SSL_EPOCHS` epochs, then one forward pass over both sets for the features; its
linear probe is negligible. Its encoder is a small-cnn whatever ``--model``, so with a larger model its
share is overstated. Data loading, preprocessing defenses and the report are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from ..progress import duration
from .defenses import Defense
from .train import SSL_EPOCHS

#: Plain epochs per SimCLR epoch (two views of every image).
SSL_PASSES = 2.5
#: Cost of a forward pass relative to a forward and backward pass.
FORWARD = 1 / 3


@dataclass(frozen=True)
class SettingCost:
    """The estimated cost of one training run.

    Attributes:
        setting: ``"DEFENSE / TRAINING_SET"`` as in the report (``"at:8 / protected"``).
        per_epoch: plain epochs per epoch of this setting (training and evaluation).
        units: plain epochs for the whole run.
    """

    setting: str
    per_epoch: float
    units: float


def classifier_cost(defense: Defense, name: str, epochs: int, n_train: int, n_test: int) -> SettingCost:
    """The cost of training a classifier on ``n_train`` images under ``defense`` for ``epochs``."""
    per_epoch = 1 + defense.pgd_steps + FORWARD * n_test / n_train
    return SettingCost(f"{defense.name} / {name}", per_epoch, epochs * per_epoch)


def probe_cost(name: str, epochs: int, n_train: int, n_test: int) -> SettingCost:
    """The cost of `linear_probe_ssl` on ``n_train`` images; ``per_epoch`` is a SimCLR epoch's."""
    features = FORWARD * (n_train + n_test) / n_train
    return SettingCost(f"ssl-probe / {name}", SSL_PASSES, SSL_EPOCHS * SSL_PASSES + features)


def cost_table(costs: list[SettingCost]) -> str:
    """The estimate as printed before training: one line per setting with its plain epochs and share."""
    total = sum(c.units for c in costs)
    width = max(len(c.setting) for c in costs)
    lines = [("cost estimate, in plain epochs (one forward+backward pass over the training set; "
              "an estimate: preprocessing and data loading not counted):")]
    lines.append(f"  {'setting':<{width}}  {'epochs':>7}  share")
    lines += [f"  {c.setting:<{width}}  {c.units:7.1f}  {100 * c.units / total:3.0f} %" for c in costs]
    lines.append(f"  {'total':<{width}}  {total:7.1f}")
    return "\n".join(lines)


class Forecast:
    """An ``on_epoch`` callback for the audit's first training run: turns its first timed epoch into an
    estimate of the whole audit's seconds (``seconds``), printed once to ``stream``."""

    def __init__(self, costs: list[SettingCost], stream: TextIO):
        self.costs, self.stream = costs, stream
        self.seconds: float | None = None

    def __call__(self, epoch: int, seconds: float) -> None:
        if self.seconds is not None:
            return
        self.seconds = seconds / self.costs[0].per_epoch * sum(c.units for c in self.costs)
        print(f"ue-datasets: the first epoch took {duration(seconds)}: about {duration(self.seconds)} for the whole "
              "audit (an estimate from the plain epochs above)", file=self.stream, flush=True)
