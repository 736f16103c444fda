"""The ``ue-datasets`` command line: what each command runs (the options are in `ue_datasets.cli_parser`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cli_parser import build_parser
from .errors import UEDatasetsError


def _triple(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        raise UEDatasetsError(f"--{name} takes one or three comma-separated numbers, got {text!r}")
    return values * 3 if len(values) == 1 else values


def _fit_clusters(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .artifact import ArtifactError
    from .audit.purity import PURITY
    from .encoders import parse_encoder
    from .fit.clusters import fit_clusters, label_purity, remove_cache

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ArtifactError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    cache = args.cache or f"{str(out).rstrip('/')}.cache"
    spec = parse_encoder(args.encoder, size=args.image_size, mean=_triple(args.mean, "mean"),
                         std=_triple(args.std, "std"))
    protection = fit_clusters(
        args.input[0] if len(args.input) == 1 else args.input, spec, clusters=args.clusters, eps=args.eps,
        mode=args.mode, cluster_data=args.cluster_data,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, resolution=args.resolution, seed=args.seed,
        kmeans_mode=args.kmeans, device=args.device, cache_dir=cache, keep_cache=True, image_field=args.image_field,
        key_field=args.key_field, limit=args.limit, key=args.key, grid=args.grid, kernel_size=args.kernel_size,
        blur=args.blur, progress=not args.no_progress, engine=_engine(args),
    )
    protection.save(out, overwrite=args.overwrite)
    if not args.keep_cache:  # only once the artifact is safely written
        remove_cache(cache)
    p = protection.params
    bound = "unbounded (filters)" if p["eps"] is None else f"eps {p['eps'] * 255:.1f}/255"
    print(f"fitted clusters: {p['samples']} images in {p['num_clusters']} clusters (sizes {p['cluster_sizes']}), "
          f"{bound}, {p['mode']} mode -> {out} (id {protection.id})")
    src = args.input[0] if len(args.input) == 1 else args.input
    try:
        purity = label_purity(protection, src, label_field=args.label_field, image_field=args.image_field,
                              key_field=args.key_field)
    except UEDatasetsError as e:  # the artifact is saved: say why purity is missing, and go on
        print(f"cluster purity: not measured ({' '.join(str(e).split())})")
    else:
        low = f": below about {PURITY}, cluster-wise noise protects little against these labels"
        print(f"cluster purity w.r.t. the source's labels: {purity:.3f}{low if purity < PURITY else ''} "
              "(the fit never used them)")
    print("keep this directory secret: it holds the perturbations")
    return 0


def _fit_em(args: argparse.Namespace) -> int:
    """``fit em`` and ``fit salm``: fit into a cache beside the output, save, then drop the cache."""
    from pathlib import Path

    from .fit import fit
    from .fit.em import remove_cache

    out = Path(args.output)
    cache = args.cache or f"{str(out).rstrip('/')}.cache"
    options = dict(
        label_field=args.label_field, image_field=args.image_field, key_field=args.key_field,
        num_classes=args.num_classes, surrogate=args.surrogate, eps=args.eps, step_size=args.step_size,
        pgd_steps=args.pgd_steps, train_steps=args.train_steps, stop_accuracy=args.stop_accuracy,
        max_rounds=args.max_rounds, batch_size=args.batch_size, lr=args.lr, legacy_clamp=args.legacy_clamp,
        device=args.device, seed=args.seed, cache_dir=cache, keep_cache=True, limit=args.limit,
        progress=not args.no_progress,
    )
    if args.method == "em":
        options.update(mode=args.mode, subset=args.subset, resolution=args.resolution)
    else:
        options.update(mask_ratio=args.mask_ratio, mask_criterion=args.mask_criterion, mask_refresh=args.mask_refresh)
    src = args.input[0] if len(args.input) == 1 else args.input
    # fit() refuses a non-empty output before fitting and writes a sample-wise bank beside it, then into it
    protection = fit(args.method, src, output=out, overwrite=args.overwrite, **options)
    if not args.keep_cache:  # only once the artifact is safely written
        remove_cache(cache, args.method)
    p = protection.params
    history = ", ".join(f"{100 * a:.1f}" for a in p["accuracy_history"][-5:])
    print(f"fitted {protection.method} ({p['mode']}): {p['samples']} images, {p['num_classes']} classes, "
          f"eps {p['eps'] * 255:.1f}/255, {p['rounds']} rounds (stopped by {p['stopped']}; surrogate accuracy "
          f"on protected images, last rounds: {history} %) -> {out} (id {protection.id})")
    print("keep this directory secret: it holds the noise")
    return 0


def _fit_t2ue(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .artifact import ArtifactError
    from .fit.checkpoint import remove_cache
    from .fit.t2ue import fit_t2ue

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ArtifactError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    cache = args.cache or f"{str(out).rstrip('/')}.cache"
    protection = fit_t2ue(
        args.input, clip=args.clip, caption_field=args.caption_field, image_field=args.image_field, eps=args.eps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        logit_scale=args.logit_scale, resolution=args.resolution, mode=args.mode, seed=args.seed,
        device=args.device, cache_dir=cache, init=args.init, limit=args.limit, progress=not args.no_progress,
    )
    protection.save(out, overwrite=args.overwrite)
    if not args.keep_cache:  # only once the artifact is safely written
        remove_cache(cache, "t2ue", store=False)  # a store beside it is an EM fit's
    p = protection.params
    losses = ", ".join(f"{v:.3f}" for v in p["loss_history"][-5:]) or "none (no epoch run)"
    print(f"fitted t2ue ({args.mode}-wise): generator {p['resolution']} px, eps {p['eps'] * 255:.1f}/255, "
          f"{p['epochs']} epochs (InfoNCE, last epochs: {losses}) -> {out} (id {protection.id})")
    print("keep this directory secret: its generator makes the noise; `ue-datasets noise` makes it from text alone")
    return 0


def _fit_uge(args: argparse.Namespace) -> int:
    """``fit uge``: fit into a cache beside the output (a sample store and checkpoints), save, drop the cache."""
    from pathlib import Path

    from .artifact import ArtifactError
    from .fit.checkpoint import remove_cache
    from .fit.uge import fit_uge

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # refused now, not after a long fit
        raise ArtifactError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    cache = args.cache or f"{str(out).rstrip('/')}.cache"
    had_store = (Path(cache) / "store").exists()  # another fit's (EM's) sample store: not this run's to remove
    protection = fit_uge(
        args.input, authorized=args.authorized, authorized_seed=args.authorized_seed, encoder=args.encoder,
        feature_target=args.feature_target,
        label_field=args.label_field, image_field=args.image_field, key_field=args.key_field,
        num_classes=args.num_classes, eps=args.eps, resolution=args.resolution, lambda_gm=args.lambda_gm,
        lambda_fd=args.lambda_fd, lambda_ud=args.lambda_ud, tau=args.tau, rounds=args.rounds,
        train_steps=args.train_steps, pgd_steps=args.pgd_steps, step_size=args.step_size,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device, limit=args.limit,
        cache_dir=cache, progress=not args.no_progress,
    )
    protection.save(out, overwrite=args.overwrite)
    if not args.keep_cache:  # only once the artifact is safely written; fit_uge's sample store is in cache/store
        remove_cache(cache, "uge", store=not had_store)
    p = protection.params
    last = {name: (values[-1] if values else None) for name, values in p.get("history", {}).items()}
    losses = ", ".join(f"{name} {'n/a' if last.get(name) is None else f'{last[name]:.4g}'}"
                       for name in ("gm", "fd", "ud"))
    print(f"fitted uge (class-wise): {p['samples']} images, {p['num_classes']} classes, eps {p['eps'] * 255:.1f}/255, "
          f"{p['rounds']} rounds (last round: {losses}), authorized {p['authorized']['arch']} -> {out} "
          f"(id {protection.id})")
    print("keep this directory secret: it holds the noise and the authorized network's secret initialisation; "
          "authorized users get the network from `ue_datasets.authorized_model(DIR)`")
    return 0


def _noise(args: argparse.Namespace) -> int:
    from .apply.generators import noise_file

    path = noise_file(args.protection, args.text, args.output, key=args.key, size=args.size, device=args.device,
                      overwrite=args.overwrite)
    print(f"noise of {args.text!r} -> {path}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .fit import fit_convolution

    if args.method == "t2ue":
        return _fit_t2ue(args)
    if args.method == "uge":
        return _fit_uge(args)
    if args.method == "clusters":
        return _fit_clusters(args)
    if args.method in ("em", "salm"):
        return _fit_em(args)

    protection = fit_convolution(
        args.num_classes, args.key, kernel_size=args.kernel_size, blur=args.blur, universal=args.universal,
        grayscale=args.grayscale, fraction=args.fraction, quantize=args.quantize,
    )
    out = protection.save(args.output, overwrite=args.overwrite)
    print(f"fitted cuda ({protection.method}): {args.num_classes} classes, k={args.kernel_size}, blur={args.blur} "
          f"-> {out} (id {protection.id})")
    print("keep this directory and the key secret: they regenerate the protection")
    return 0


def _text_options(args: argparse.Namespace) -> tuple[str, ...]:
    """Check ``--template`` before any work; the class names of ``--class-names``."""
    from .apply.texts import check_template, read_class_names

    if args.template is not None:
        check_template(args.template)
    return read_class_names(args.class_names) if args.class_names else ()


def _engine(args: argparse.Namespace) -> Any:
    """``--engine`` and its options: ``"local"`` or a `RayEngine` (ray not installed: the install command)."""
    if args.engine == "local":
        if args.ray_address is not None or args.gpus_per_task:
            raise UEDatasetsError("--ray-address and --gpus-per-task are options of --engine ray")
        return "local"
    from .apply.ray import RayEngine, require_ray

    require_ray()
    return RayEngine(address=args.ray_address, gpus_per_task=args.gpus_per_task)


def _protect(args: argparse.Namespace) -> int:
    from .apply.protect import TooManySkipped, protect

    class_names = _text_options(args)
    engine = _engine(args)
    try:
        result = protect(
            args.input, args.output, args.protection, label_field=args.label_field, image_field=args.image_field,
            key_field=args.key_field, keep_fields=args.keep_field, batch_size=args.batch_size, device=args.device,
            encoder=args.encoder, on_error=args.on_error, max_skipped=args.max_skipped, png_level=args.png_level,
            max_pixels=args.max_pixels, unfitted=args.unfitted, text_field=args.caption_field, format=args.format,
            class_names=class_names, template=args.template, workers=args.workers, engine=engine,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except TooManySkipped as e:
        print(e.result.summary())
        print(f"ue-datasets: error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    if result.skipped:
        print("skipped samples are listed with their reasons in the *_stats.json files", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .artifact import load_protection, read_manifest

    protection = load_protection(args.artifact) if args.verify else None
    manifest = protection.manifest() if protection is not None else read_manifest(args.artifact)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    if protection is not None:
        if protection.bank is not None:  # every shard re-hashed against the bank's manifest
            protection.bank.verify()
        bank = f" (and its noise bank, {protection.bank.entries} entries)" if protection.bank is not None else ""
        print(f"digest verified{bank}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    import os

    from .apply.commit import read_json, write_json
    from .apply.verify import verify

    if args.report and os.path.exists(args.report):  # replace only an earlier report, never a file of yours
        previous = read_json(args.report)
        if previous is None or not {"ok", "pixels_checked", "protection"} <= set(previous):
            raise UEDatasetsError(f"{args.report}: exists and is not a verify report; nothing is replaced: "
                                  "choose another --report file")
    class_names = _text_options(args)
    report = verify(args.protection, args.input, args.clean, args.sample, label_field=args.label_field,
                    image_field=args.image_field, key_field=args.key_field, keep_fields=args.keep_field,
                    device=args.device, encoder=args.encoder, seed=args.seed, progress=not args.no_progress,
                    text_field=args.caption_field, class_names=class_names, template=args.template)
    print(report.summary())
    if args.report:
        write_json(args.report, report.to_dict())
    return 0 if report.ok else 1


def _audit(args: argparse.Namespace) -> int:
    from .audit import AuditConfig, run_audit
    from .audit.report import markdown_table

    config = AuditConfig(
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        defenses=tuple(d.strip() for d in args.defense.split(",") if d.strip()), relabel=args.relabel,
        probe=args.probe, baseline=not args.no_baseline, device=args.device, image_size=args.image_size,
        limit=args.limit, label_field=args.label_field, image_field=args.image_field, key_field=args.key_field,
        protection=args.protection, oracle=not args.no_oracle, authorized=args.authorized,
    )
    report = run_audit(args.protected, args.clean, args.test, args.output, config, progress=not args.no_progress)
    print(markdown_table(report))
    files = report["files"]
    others = ", ".join(name for name in files if name != "report.md")
    print(f"report: {files['report.md']} ({others}) [{report['seconds']:.0f} s]")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output, progress=not args.no_progress)
    st = result["shard_stats"]
    print(f"protected {st['protected']} of {st['samples']} Fashion-MNIST images with CUDA (demo key 0)")
    print(f"  protection artifact: {result['protection']}")
    print(f"  protected shard:     {result['shard']}")
    print(f"  shard stats:         {result['stats']}")
    print(f"  before/after grid:   {result['grid']}")
    print("next: `ue-datasets protect --protection DIR --input YOUR_SHARDS --output OUT` with your own key")
    return 0


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    """Warnings as the CLI's own lines (``ue-datasets: warning: ...``), not as Python source locations."""
    print(f"ue-datasets: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    handler = {"fit": _fit, "protect": _protect, "inspect": _inspect, "verify": _verify, "audit": _audit,
               "noise": _noise, "demo": _demo}[args.command]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return handler(args)
    except UEDatasetsError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, always
        print(f"ue-datasets: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # an OS or network failure no adapter turned into a UEDatasetsError
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"ue-datasets: error: {where}{e.strerror or e} ({type(e).__name__})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ue-datasets: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
