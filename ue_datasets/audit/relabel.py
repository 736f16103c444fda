"""The attacker's labelling, for label-agnostic audits: relabel maps and merged super-classes.

A cluster-wise protection must hold however the attacker labels the data: the protector had m
clusters, the attacker trains an n-class model. `parse_relabel` turns ``--relabel`` into a label map
applied to the training and the test labels alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UEDatasetsError


def merge_map(num_classes: int, groups: int) -> torch.Tensor:
    """Merge ``num_classes`` classes into ``groups`` contiguous super-classes: ``c -> c * groups // num_classes``."""
    if not 1 <= groups <= num_classes:
        raise UEDatasetsError(f"merge:N needs 1 <= N <= {num_classes}, got {groups}")
    return torch.arange(num_classes) * groups // num_classes


def parse_relabel(spec: str | None, num_classes: int) -> torch.Tensor | None:
    """A label map ``(num_classes,)`` int64 from ``spec``, or ``None`` for the true labels.

    ``spec`` is ``merge:N``; an inline map ``"0:1,1:0,2:2"``; or a JSON file ``{"0": 1, "1": 0, ...}``.
    Every class must be mapped; new labels are renumbered 0..n-1 in order of first appearance.
    """
    if spec is None or spec in ("", "none"):
        return None
    if spec.startswith("merge:"):
        try:
            return merge_map(num_classes, int(spec.split(":", 1)[1]))
        except ValueError:
            raise UEDatasetsError(f"--relabel {spec!r}: merge:N takes an integer N") from None
    if Path(spec).is_file():
        raw = json.loads(Path(spec).read_text())
        pairs = [(int(k), int(v)) for k, v in raw.items()]
    else:
        try:
            pairs = [tuple(int(v) for v in item.split(":")) for item in spec.split(",")]
        except ValueError:
            raise UEDatasetsError(f"--relabel {spec!r}: expected merge:N, 'old:new,...' or a JSON file") from None
    mapping = dict(pairs)
    missing = [c for c in range(num_classes) if c not in mapping]
    if missing:
        raise UEDatasetsError(f"--relabel {spec!r} does not map classes {missing}")
    order = {v: i for i, v in enumerate(dict.fromkeys(mapping[c] for c in range(num_classes)))}
    return torch.tensor([order[mapping[c]] for c in range(num_classes)], dtype=torch.int64)
