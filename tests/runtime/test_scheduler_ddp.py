"""DDP under torchrun (2 CPU processes, gloo): identical masks and weights on every rank after updates."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

HERE = Path(__file__).resolve().parents[1]  # tests/


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("tile", [None, 8], ids=["unstructured", "tiles"])
def test_ddp_ranks_end_every_update_with_identical_masks(tmp_path, tile):
    out = tmp_path / "verdict.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_ddp_worker.py"), str(out), *([] if tile is None else [str(tile)])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    verdict = json.loads(out.read_text())
    assert verdict["world"] == 2
    assert verdict["errors"] == []
    assert verdict["updates"] == 4, "every update step must run on both ranks"
    assert verdict["changed"] > 0 and verdict["grown_random"] > 0, "the run must exercise random growth"
