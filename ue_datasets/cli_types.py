"""Argument types and option groups shared by the command line's parsers (standard library only)."""

from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_engine_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """``--engine local|ray``, ``--ray-address``, ``--gpus-per-task``; ``work`` says what one Ray task does."""
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help=f"local: this machine; ray: on a Ray cluster, {work} (needs: pip install \"ue-datasets[ray]\")")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="--engine ray: the cluster to join (default: start a local one for the run)")
    p.add_argument("--gpus-per-task", type=non_negative_float, default=0.0, metavar="F",
                   help="--engine ray: GPUs each task holds (0.25: four tasks share a GPU; default 0: CPU tasks)")
