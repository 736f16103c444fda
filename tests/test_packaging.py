"""Packaging: `transforms/` installs as `ue_datasets.transforms`, never as a top-level `transforms`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ue_datasets.demo import demo_shard


@pytest.mark.slow
def test_transforms_folder_installs_under_the_package_only(tmp_path):
    # Run from an empty folder so the repository root is not on sys.path.
    code = (
        "import importlib.util, ue_datasets.transforms as t; "
        "print(importlib.util.find_spec('transforms') is None, t.Protect.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "ue_datasets.transforms.protect"]


def test_demo_shard_ships_with_the_package():
    assert demo_shard().is_file() and demo_shard().stat().st_size > 100_000

