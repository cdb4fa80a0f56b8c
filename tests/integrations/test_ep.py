"""examples/ep_moe.py: expert parallelism over 2 CPU processes (gloo), summed by all-reduce."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ep_moe.py"


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
def test_two_ranks_on_gloo_match_the_reference():
    env = {**os.environ, "MOE_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(EXAMPLE), "--device", "cpu", "--experts", "9", "--tokens", "24"]  # 9 experts: 5 + 4
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(
        r"ep_size=2 experts=9 \(rank 0 holds 5\).*backend=gloo: relative error vs float64 reference (\S+)",
        proc.stdout,
    )
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 1e-4
