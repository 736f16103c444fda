"""Run an audit: train on protected and on clean data, under each defense, and report what was learned."""

from __future__ import annotations

import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import fsspec
import torch

from ..apply.commit import stats_url
from ..apply.core import protect_batch, resolve_device
from ..apply.sources import HF_STATS, resolve
from ..artifact import Protection, load_protection
from ..errors import UEDatasetsError
from ..version import __version__
from .checks import audit_warnings
from .cost import Forecast, SettingCost, classifier_cost, cost_table, probe_cost
from .data import LabelledImages, align, load_labelled
from .defenses import Defense, parse_defenses
from .metrics import difference_grid, imperceptibility
from .purity import cluster_purity, clusters_of, is_cluster_wise, oracle_protection
from .relabel import parse_relabel
from .report import plot_accuracy, write_json, write_markdown
from .train import TrainConfig, linear_probe_ssl, train_classifier, train_model

#: The training sets the authorized network of a UGE protection (``--authorized``) trains on: the protected
#: set, and the clean set when a baseline is trained.
AUTHORIZED_SETS = ("authorized", "authorized-clean")


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
        protection: the artifact directory the protected set was made with (the protector's secret), used
            only for the diagnostics of cluster-wise protections: the purity of the protector's clusters of
            the clean training set w.r.t. the true and the attacker's labels (``report["clusters"]``). Needs
            the clean set; ignored (``clusters: None``) for other methods.
        oracle: with such a protection, also train on the ``oracle`` set: the clean training set protected
            with the same perturbations by the attacker's labels modulo K
            (`ue_datasets.audit.purity.oracle_protection`), the most this perturbation could do with
            perfect clusters.
        authorized: a UGE artifact directory (`ue_datasets.fit.uge.fit_uge`, the protector's secret): the
            audit then also trains the authorized network, rebuilt with its secret initialisation by
            `ue_datasets.fit.uge.authorized_model` (a fresh one per run; its architecture, not ``model``), on
            the protected set, and on the clean set when a baseline is trained, under every defense,
            reported as training sets ``authorized`` and ``authorized-clean``. The artifact must be the one
            the protected set names (when its stats say), and its network must take the data's channels and
            size; refused with ``relabel`` (the network has the artifact's classes).
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
    protection: str | None = None
    oracle: bool = True
    authorized: str | None = None


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
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train on ``protected`` (and ``clean``, and the oracle set) under each defense, test on clean ``test``;
    write the report.

    Writes ``report.json``, ``report.md``, ``accuracy.png`` and ``grid.png`` (with a clean set) into
    ``output``. Before training, prints a cost estimate per setting to ``stream`` (default
    ``sys.stderr``), then after the first epoch an estimate of the total seconds; at the end, the
    report's warnings (`ue_datasets.audit.checks`).

    With ``config.protection`` naming a cluster-wise protection, also reports ``clusters`` (`_clusters`)
    and, with ``config.oracle``, trains an ``oracle`` set beside ``clean`` and ``protected``.
    With ``config.authorized`` (a UGE artifact), also trains its authorized network on the protected set
    (``authorized``) and, with a baseline, on the clean one (``authorized-clean``), and reports
    ``authorized`` (`_authorized_section`).

    Returns:
        The report (as in ``report.json``): ``warnings`` (lines), ``cost`` (estimate and measured
        seconds per setting), ``clusters`` (``None`` without a cluster-wise ``config.protection``),
        ``authorized`` (``None`` without ``config.authorized``) and ``files`` (file name -> path written)
        among the rest.

    Raises:
        UEDatasetsError: among others, a cluster-wise ``config.protection`` without a ``clean`` set, or a
            ``config.authorized`` that is not the protected set's protection or does not fit its images.
    """
    start = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    defenses = parse_defenses(",".join(config.defenses))
    device = str(resolve_device(config.device))
    named = _protection_of(protected)
    protection = load_protection(config.protection) if config.protection else None
    if protection is not None:
        _check_protection(protection, named, protected, clean, config)
    authorized = load_protection(config.authorized) if config.authorized else None
    if authorized is not None:
        _check_authorized(authorized, named, protection, protected, config)
    sets = _load(protected, clean, test, config)
    if authorized is not None:
        _check_authorized_data(authorized, sets, config)
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
        "protection": named,
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
    report["clusters"], oracle = None, None
    report["authorized"] = None
    if protection is not None and is_cluster_wise(protection) and sets.clean is not None:
        report["clusters"], oracle = _clusters(protection, sets.clean, relabelled, config.oracle, device)
        if oracle is not None:
            report["sizes"]["oracle"] = len(oracle)

    training_sets = [("clean", sets.clean)] if (config.baseline and sets.clean is not None) else []
    training_sets.append(("protected", sets.protected))
    if oracle is not None:
        training_sets.append(("oracle", oracle))
    if authorized is not None:
        report["authorized"] = _authorized_section(authorized, config.authorized)
        training_sets.append(("authorized", sets.protected))
        if config.baseline and sets.clean is not None:
            training_sets.append(("authorized-clean", sets.clean))
    plan: list[tuple[Defense | None, str, LabelledImages]] = [
        (d, name, data) for d in defenses for name, data in training_sets]
    if config.probe:  # a SimCLR small-cnn whatever the set: the authorized sets would repeat their data's
        plan += [(None, name, data) for name, data in training_sets if name not in AUTHORIZED_SETS]
    costs = _costs(plan, config.epochs, len(sets.test))
    stream = stream or sys.stderr
    if protection is not None and report["clusters"] is None:
        print(f"ue-datasets: note: --protection: a {protection.method!r} protection has no clusters, so there is no "
              "purity diagnostic or oracle set", file=stream)
    print("ue-datasets: " + cost_table(costs), file=stream, flush=True)
    forecast = Forecast(costs, stream)
    for i, (d, name, data) in enumerate(plan):
        cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                          device=device, **({} if d is None else _training(d)))
        if d is None:
            result = linear_probe_ssl(data.images, relabelled(data.labels), sets.test.images, test_y, n_out, cfg,
                                      progress=f"ssl-probe / {name}" if progress else None)
        elif name in AUTHORIZED_SETS:  # the caller's (secret) initialisation, a fresh network per run
            x = data.images if d.apply is None else d.apply(data.images, config.seed)
            result = train_model(_authorized_model(authorized), x, relabelled(data.labels), sets.test.images, test_y,
                                 int(authorized.params["authorized"]["num_classes"]), cfg,
                                 progress=f"{d.name} / {name}" if progress else None)
        else:
            x = data.images if d.apply is None else d.apply(data.images, config.seed)
            result = train_classifier(config.model, x, relabelled(data.labels), sets.test.images, test_y, n_out, cfg,
                                      progress=f"{d.name} / {name}" if progress else None,
                                      on_epoch=forecast if i == 0 else None)
        report["results"].append({"defense": "ssl-probe" if d is None else d.name, "training_set": name,
                                  **asdict(result)})
    report["cost"] = _cost_report(costs, report["results"], forecast.seconds)
    report["warnings"] = audit_warnings(report)
    report["seconds"] = round(time.perf_counter() - start, 2)
    files = {"report.json": out / "report.json", "report.md": out / "report.md", "accuracy.png": out / "accuracy.png"}
    if sets.clean is not None:
        files["grid.png"] = out / "grid.png"
    report["files"] = {k: str(v) for k, v in files.items()}
    write_json(report, files["report.json"])
    write_markdown(report, files["report.md"])
    plot_accuracy(report, files["accuracy.png"])
    for warning in report["warnings"]:
        print(f"ue-datasets: warning: {warning}", file=stream)
    return report


def _check_protection(protection: Protection, named: dict[str, Any] | None, protected: str, clean: str | None,
                      config: AuditConfig) -> None:
    """Refuse a ``--protection`` the diagnostics would misread: another protection than the one the
    protected set names, no clean set, or clean images resized (``--image-size``) away from the pixels
    the protection saw (their clusters and oracle would not be the ones apply gave). ``named``: what the
    protected set's stats say it was made with (`_protection_of`)."""
    if named is not None and named.get("id") not in (None, protection.id):
        raise UEDatasetsError(f"--protection {config.protection}: its id {protection.id} is not the id "
                              f"{named.get('id')} the protected set {protected} was made with")
    if not is_cluster_wise(protection):
        return
    if clean is None:
        raise UEDatasetsError("--protection with a cluster-wise protection: the cluster purity and the oracle bound "
                              "are computed on the clean training set; pass it as --clean")
    if config.image_size is not None:
        raise UEDatasetsError("--protection with --image-size: the purity and the oracle need the clean images at "
                              "the size they were protected at; drop --image-size")


def _authorized_model(authorized: Protection) -> torch.nn.Module:
    """The untrained authorized network of a UGE protection, with its secret initialisation."""
    from ..fit.uge import authorized_model

    return authorized_model(authorized)


def _check_authorized(authorized: Protection, named: dict[str, Any] | None, protection: Protection | None,
                      protected: str, config: AuditConfig) -> None:
    """Refuse an ``--authorized`` artifact before loading the data: not a UGE protection (no authorized
    network), another protection than the one the protected set names (or than ``--protection``), or
    ``--relabel`` (the authorized network has the artifact's classes, not the attacker's)."""
    spec = authorized.params.get("authorized")
    if not isinstance(spec, dict) or not {"arch", "num_classes", "in_channels", "image_size"} <= set(spec):
        raise UEDatasetsError(f"--authorized {config.authorized}: a {authorized.method!r} protection has no "
                              "authorized network; pass a UGE artifact (`ue-datasets fit uge`)")
    if named is not None and named.get("id") not in (None, authorized.id):
        raise UEDatasetsError(f"--authorized {config.authorized}: its id {authorized.id} is not the id "
                              f"{named.get('id')} the protected set {protected} was made with")
    if protection is not None and protection.id != authorized.id:
        raise UEDatasetsError(f"--authorized {config.authorized} (id {authorized.id}) and --protection "
                              f"{config.protection} (id {protection.id}) are different protections")
    if config.relabel is not None:
        raise UEDatasetsError("--authorized with --relabel: the authorized network classifies the artifact's "
                              f"{spec['num_classes']} classes, not the attacker's; drop one of them")


def _check_authorized_data(authorized: Protection, sets: _Sets, config: AuditConfig) -> None:
    """Refuse data the authorized network cannot take: other channels, another image size, labels
    beyond its classes."""
    spec = authorized.params["authorized"]
    c, h, w = sets.test.images.shape[1:]
    resize = " (after --image-size)" if config.image_size is not None else ""
    if c != int(spec["in_channels"]):
        raise UEDatasetsError(f"--authorized {config.authorized}: its network takes {spec['in_channels']}-channel "
                              f"images, the data has {c} channels")
    size = int(spec["image_size"])
    if max(h, w) != size:
        hint = f"; pass --image-size {size}" if config.image_size is None else f"; pass --image-size {size} instead"
        raise UEDatasetsError(f"--authorized {config.authorized}: its network was built for {size} px images, the "
                              f"data{resize} is {h}x{w}{hint}")
    top = max(int(s.labels.max()) for s in (sets.protected, sets.clean, sets.test) if s is not None)
    if top >= int(spec["num_classes"]):
        raise UEDatasetsError(f"--authorized {config.authorized}: its network has {spec['num_classes']} classes, "
                              f"the data has labels up to {top}")


def _authorized_section(authorized: Protection, path: str | None) -> dict[str, Any]:
    """``report["authorized"]``: which artifact's network was trained; never its secret seed."""
    spec = authorized.params["authorized"]
    return {"artifact": path, "id": authorized.id, "arch": spec["arch"], "num_classes": int(spec["num_classes"]),
            "in_channels": int(spec["in_channels"]), "image_size": int(spec["image_size"])}


def _clusters(protection: Protection, clean: LabelledImages, relabelled: Any, oracle: bool,
              device: str, batch_size: int = 256) -> tuple[dict[str, Any], LabelledImages | None]:
    """``report["clusters"]`` and the oracle training set (or ``None`` without ``oracle``).

    The protector's clusters of the clean training set are the ones apply gives (`clusters_of`);
    ``purity`` is `cluster_purity` w.r.t. the true labels and the attacker's (relabelled) ones. The
    oracle set is the clean set protected by `oracle_protection` with the attacker's labels modulo K;
    its labels stay the true ones (relabelled for training like every set's).
    """
    k = int(protection.params["num_clusters"])
    clusters = clusters_of(protection, clean.images, clean.keys, batch_size, device)
    attacker = relabelled(clean.labels)
    section = {
        "num_clusters": k,
        "sizes": torch.bincount(clusters, minlength=k).tolist(),
        "purity": {"true labels": round(cluster_purity(clusters, clean.labels), 4),
                   "attacker labels": round(cluster_purity(clusters, attacker), 4)},
        "oracle": oracle,
    }
    if not oracle:
        return section, None
    o = oracle_protection(protection)
    images = torch.cat([
        protect_batch(o, clean.images[i:i + batch_size], labels=attacker[i:i + batch_size] % k,
                      keys=clean.keys[i:i + batch_size], device=device)
        for i in range(0, len(clean), batch_size)])
    return section, LabelledImages(images, clean.labels, clean.keys, f"oracle({clean.source})")


def _training(d: Defense) -> dict[str, Any]:
    """The `TrainConfig` fields a defense sets (augmentation, adversarial training)."""
    if d.adversarial_eps is None:
        return {"augment": d.augment}
    return {"augment": d.augment, "adversarial_eps": d.adversarial_eps, "pgd_steps": d.pgd_steps,
            "pgd_step": d.pgd_step}


def _costs(plan: list[tuple[Defense | None, str, LabelledImages]], epochs: int, n_test: int) -> list[SettingCost]:
    """One cost per run of ``plan`` (clean, protected, oracle and authorized sets alike, by their sizes); the
    oracle set's making (one protect pass over the clean set) happens before the estimate and is not counted.
    The authorized runs are counted in plain epochs of the target model, also where the authorized network's
    architecture is another."""
    return [probe_cost(name, epochs, len(data), n_test) if d is None
            else classifier_cost(d, name, epochs, len(data), n_test) for d, name, data in plan]


def _cost_report(costs: list[SettingCost], results: list[dict[str, Any]],
                 estimated_seconds: float | None) -> dict[str, Any]:
    """``report["cost"]``: the estimate made before training next to each run's measured seconds."""
    total = sum(c.units for c in costs)
    return {
        "unit": "plain epoch: one forward and backward pass of the model over the training set",
        "estimated_seconds": None if estimated_seconds is None else round(estimated_seconds, 2),
        "settings": [{"setting": c.setting, "estimated_units": round(c.units, 3),
                      "estimated_share": round(c.units / total, 4),
                      "seconds": r["seconds"]} for c, r in zip(costs, results)],
    }
