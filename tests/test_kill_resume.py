"""A `ue-datasets protect` process killed with SIGKILL mid-run resumes to the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import encode, write_shard

N_SHARDS = 24


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_run_resumes_to_identical_output(tmp_path, protection):
    protection.save(tmp_path / "prot")
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    for s in range(N_SHARDS):
        samples = [
            {"__key__": f"s{s:02d}_{i:03d}", "png": encode(Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))),
             "cls": str(i % 10).encode()}
            for i in range(24)
        ]
        write_shard(tmp_path / "in" / f"part-{s:02d}.tar", samples)
    cmd = [sys.executable, "-m", "ue_datasets.cli", "protect", "--protection", str(tmp_path / "prot"),
           "--input", str(tmp_path / "in"), "--no-progress", "--device", "cpu", "--batch-size", "8"]

    proc = subprocess.Popen([*cmd, "--output", str(tmp_path / "killed")], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in (tmp_path / "killed").glob("*_stats.json")}
    assert 0 < len(done_before) < N_SHARDS, "the run should be killed part-way"
    finals = {p.name for p in (tmp_path / "killed").glob("*.tar")}
    recorded = {n.replace("_stats.json", ".tar") for n in done_before}
    assert finals <= recorded and len(finals) >= len(recorded) - 1
    # (stats are written before the rename: the shard being committed at the instant of the kill may have
    # its stats without its file; it does not check out and is redone)

    subprocess.run([*cmd, "--output", str(tmp_path / "killed")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*cmd, "--output", str(tmp_path / "clean")], check=True, stdout=subprocess.DEVNULL)
    killed = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert killed == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert not [n for n in killed if n.endswith(".partial")]
    for name in killed:
        if name.endswith(".tar"):
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
