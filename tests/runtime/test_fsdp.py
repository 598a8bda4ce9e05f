"""FSDP2 per block (sparsify(..., blocks="auto"), fully_shard on every rewritten block, then on sm) against the
single-process run of the same model, seed and data, under torchrun on gloo (tests/_fsdp_worker.py)."""
import json

import pytest
import torch.distributed as dist
from _torchrun import run_two_ranks

pytestmark = [pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
              pytest.mark.torchrun]


def _verdict(tmp_path, *args, ranks=2) -> dict:
    out = tmp_path / "verdict.json"
    run_two_ranks("_fsdp_worker.py", out, *args, ranks=ranks)
    return json.loads(out.read_text())


def test_two_ranks_train_as_one_process(tmp_path):
    """Masks bit-identical and sm.mst.last_update equal at all 4 updates, losses within 1e-5, the ranks' FLOP
    ledgers summing to the single-process one, every parameter a Shard(0) DTensor, masked weights and Adam
    moments exactly zero on every shard after every step, the tied head sharing the embedding."""
    v = _verdict(tmp_path, "match")
    assert v["errors"] == [] and v["world"] == 2
    assert v["updates"] == [3, 6, 9, 12]
    assert v["changed"] > 0 and v["grown_random"] > 0  # the topology really moved, random growth included
    assert abs(v["density"] - 0.4) < 1e-3  # final_sparsity 0.6
    assert v["max_loss_diff"] <= 1e-5
    assert v["shards"]["wte.weight"] == [[32, 32], [32, 32]] and v["shards"]["h.1.mlp.0.weight"] == [[64, 32], [64, 32]]


def test_gradient_accumulation_over_micro_batches(tmp_path):
    """Two micro-batches per step, each reduce-scattered and masked on its shard as it arrives: the probe steps'
    dense gradient is still the sum of both, so the masks stay those of the single-process run."""
    v = _verdict(tmp_path, "accumulate")
    assert v["errors"] == [] and v["updates"] == [3, 6, 9, 12] and v["changed"] > 0
    assert v["max_loss_diff"] <= 1e-5


def test_dcp_resume_equals_the_uninterrupted_run(tmp_path):
    """torch.distributed.checkpoint of the model, optimizer and sm.mst.state_dict() at step 8, loaded into a
    freshly initialised model: steps 9-13 (a probe step and two updates) equal the uninterrupted run exactly."""
    v = _verdict(tmp_path, "resume", tmp_path / "ckpt")
    assert v["errors"] == []
    assert v["losses"] == v["uninterrupted"] and len(v["losses"]) == 5
    assert v["updates"] == [9, 12]


def test_four_ranks_with_uneven_and_empty_shards(tmp_path):
    """4 ranks: the tied 3-row embedding/head has an empty shard on rank 3, 90-row weights shard 23, 23, 23, 21;
    grown weights start at N(0, σ²), each rank writing its own of the same draws. Still the single-process run."""
    v = _verdict(tmp_path, "uneven", ranks=4)
    assert v["errors"] == [] and v["world"] == 4
    assert v["updates"] == [3, 6, 9, 12] and v["changed"] > 0
    assert v["max_loss_diff"] <= 1e-5
    assert v["shards"]["wte.weight"] == [[1, 30], [1, 30], [1, 30], [0, 30]]
    assert v["shards"]["h.0.attn.c_attn.weight"] == [[23, 30], [23, 30], [23, 30], [21, 30]]
