"""torchrun with two CPU processes (gloo): the run completes, rank 0 alone writes, ranks stay identical."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _train_models import TINY, write

from mst_compile.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.torchrun
@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    f = write(tmp_path, "tiny.py", TINY)
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mst_compile", "train", str(f), "--steps", "12", "--update-interval", "2", "--out", str(out), "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done: 12 steps (mst)") == 1  # one summary: rank 0's
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["sharding"] == "ddp" and s["ranks_identical"] == {"masks": True, "weights": True}
    assert s["tokens"] == 12 * 4 * 32 * 2
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))  # a second writer would have duplicated lines
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt", "sha256sums", "step-0000008.pt",
                                                                     "step-0000012.pt"]
    assert min(r["density"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train") < 0.2
