"""Run an audit: train on protected and on clean data, under each defense, and report what was learned."""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

from ..apply.core import resolve_device
from ..apply.sources import HF_STATS, resolve
from ..apply.commit import stats_url
from ..errors import UEDatasetsError
from ..version import __version__
from .data import LabelledImages, align, load_labelled
from .defenses import parse_defenses
from .metrics import difference_grid, imperceptibility
from .relabel import parse_relabel
from .report import plot_accuracy, write_json, write_markdown
from .train import TrainConfig, linear_probe_ssl, train_classifier


@dataclass(frozen=True)
class AuditConfig:
    """What to train and under which defenses.

    Attributes:
        model: ``small-cnn`` (CPU-fast default), ``resnet18`` (CIFAR-style) or a torchvision name.
        epochs, batch_size, lr, seed: training settings (SGD, momentum 0.9, cosine schedule).
        defenses: defense specs (``none``, ``jpeg:10``, ``grayscale``, ``bdr``, ``median``, ``blur``,
            ``upload``, ``augment``, ``at:8``...).
        relabel: the attacker's labelling (``merge:N``, ``"old:new,..."``, a JSON file) or ``None``.
        probe: also train a SimCLR encoder without labels on each training set and report a linear
            probe on it (the label-agnostic attacker's unsupervised route).
        baseline: also train on the clean training set (the reference every row is compared with).
        device: ``auto``, ``cpu`` or ``cuda``.
        image_size: resize images to this size when loading (needed when sizes differ).
        limit: use at most this many training samples of each training set.
    """

    model: str = "small-cnn"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    defenses: tuple[str, ...] = ("none",)
    relabel: str | None = None
    probe: bool = False
    baseline: bool = True
    device: str = "auto"
    image_size: int | None = None
    limit: int | None = None
    label_field: str | None = None
    image_field: str | None = None
    key_field: str | None = None


@dataclass
class _Sets:
    protected: LabelledImages
    clean: LabelledImages | None
    test: LabelledImages


def _protection_of(src: str) -> dict[str, Any] | None:
    """The protection named by the stats written next to protected shards or files, if any."""
    source = resolve(src)
    path = posixpath.join(source.urls[0], HF_STATS) if source.kind == "hf" else stats_url(source.urls[0])
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return json.loads(f.read()).get("protection")


def _load(protected: str, clean: str | None, test: str, config: AuditConfig) -> _Sets:
    kw = dict(label_field=config.label_field, image_field=config.image_field, key_field=config.key_field,
              image_size=config.image_size)
    sets = _Sets(
        protected=load_labelled(protected, limit=config.limit, **kw),
        clean=load_labelled(clean, limit=config.limit, **kw) if clean else None,
        test=load_labelled(test, **kw),
    )
    shapes = {tuple(s.images.shape[1:]) for s in (sets.protected, sets.clean, sets.test) if s is not None}
    if len(shapes) > 1:
        raise UEDatasetsError(f"training and test images differ in shape {sorted(shapes)}; pass --image-size")
    return sets


def run_audit(
    protected: str,
    clean: str | None,
    test: str,
    output: str | Path,
    config: AuditConfig = AuditConfig(),
    progress: bool = True,
) -> dict[str, Any]:
    """Train on ``protected`` (and ``clean``) under each defense, test on clean ``test``; write the report.

    Writes ``report.json``, ``report.md``, ``accuracy.png`` and ``grid.png`` into ``output``.

    Returns:
        The report (as in ``report.json``).
    """
    start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    defenses = parse_defenses(",".join(config.defenses))
    device = str(resolve_device(config.device))
    sets = _load(protected, clean, test, config)
    num_classes = int(max(int(s.labels.max()) for s in (sets.protected, sets.clean, sets.test) if s is not None)) + 1
    mapping = parse_relabel(config.relabel, num_classes)
    relabelled = (lambda y: y) if mapping is None else (lambda y: mapping[y])
    n_out = num_classes if mapping is None else int(mapping.max()) + 1
    test_y = relabelled(sets.test.labels)

    report: dict[str, Any] = {
        "ue_datasets_version": __version__,
        "inputs": {"protected": protected, "clean": clean, "test": test},
        "sizes": {"protected": len(sets.protected), "clean": len(sets.clean) if sets.clean else 0, "test": len(sets.test),
                  "image": list(sets.test.images.shape[1:])},
        "protection": _protection_of(protected),
        "config": {**asdict(config), "defenses": [d.name for d in defenses], "device": device},
        "labels": {
            "num_classes": num_classes,
            "trained_classes": n_out,
            "map": None if mapping is None else mapping.tolist(),
            "description": "true labels" if mapping is None else f"relabelled ({config.relabel}): {num_classes} -> {n_out} classes",
        },
        "defenses": [{"name": d.name, "description": d.description} for d in defenses],
        "results": [],
    }
    if sets.clean is not None:
        a, b = align(sets.clean, sets.protected)
        report["imperceptibility"] = imperceptibility(a, b)
        difference_grid(a[:8], b[:8]).save(out / "grid.png")
    else:
        report["imperceptibility"] = None

    training_sets = [("clean", sets.clean)] if (config.baseline and sets.clean is not None) else []
    training_sets.append(("protected", sets.protected))
    for d in defenses:
        for name, data in training_sets:
            x = data.images if d.apply is None else d.apply(data.images, config.seed)
            adversarial = {} if d.adversarial_eps is None else {
                "adversarial_eps": d.adversarial_eps, "pgd_steps": d.pgd_steps, "pgd_step": d.pgd_step}
            cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                              augment=d.augment, device=device, **adversarial)
            result = train_classifier(config.model, x, relabelled(data.labels), sets.test.images, test_y, n_out, cfg,
                                      progress=f"{d.name} / {name}" if progress else None)
            report["results"].append({"defense": d.name, "training_set": name, **asdict(result)})
    if config.probe:
        for name, data in training_sets:
            cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                              device=device)
            result = linear_probe_ssl(data.images, relabelled(data.labels), sets.test.images, test_y, n_out, cfg,
                                      progress=f"ssl-probe / {name}" if progress else None)
            report["results"].append({"defense": "ssl-probe", "training_set": name, **asdict(result)})
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(report, out / "report.json")
    write_markdown(report, out / "report.md")
    plot_accuracy(report, out / "accuracy.png")
    return report
