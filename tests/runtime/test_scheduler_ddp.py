"""DDP under torchrun (2 CPU processes, gloo): identical masks and weights on every rank after updates."""
import json

import pytest
import torch.distributed as dist
from _torchrun import run_two_ranks


@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("tile", [None, 8], ids=["unstructured", "tiles"])
def test_ddp_ranks_end_every_update_with_identical_masks(tmp_path, tile):
    out = tmp_path / "verdict.json"
    run_two_ranks("_ddp_worker.py", out, *([] if tile is None else [tile]))
    verdict = json.loads(out.read_text())
    assert verdict["world"] == 2
    assert verdict["errors"] == []
    assert verdict["updates"] == 4, "every update step must run on both ranks"
    assert verdict["changed"] > 0 and verdict["grown_random"] > 0, "the run must exercise random growth"
