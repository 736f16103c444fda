"""Audit: train models on protected data and report what they learned, under an adversary's defenses.

`run_audit` (``ue-datasets audit``) trains a target model on the protected training set and, as the
baseline, on the clean one, evaluates on the clean test set after every epoch, and reports peak and
final accuracy per defense, with imperceptibility metrics and an image grid. It prints a cost estimate
per setting before training, and warns (`checks`) when the clean baseline is too weak or too short to
judge the protection by.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditConfig", "run_audit"]


def __getattr__(name: str) -> Any:  # imported lazily: the audit pulls in matplotlib and the trainers
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
