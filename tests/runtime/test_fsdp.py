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
    moments exactly zero on every shard after every step, the tied head sharing the embedding. Every step clips
    the gradient norm, which must already see the masked gradients (equal norms)."""
    v = _verdict(tmp_path, "match")
    assert v["errors"] == [] and v["world"] == 2
    assert v["updates"] == [3, 6, 9, 12]
    assert v["changed"] > 0 and v["grown_random"] > 0  # the topology really moved, random growth included
    assert abs(v["density"] - 0.4) < 1e-3  # final_sparsity 0.6
    assert v["max_loss_diff"] <= 1e-5
    assert v["clipped"] == 13 and v["max_norm_diff"] <= 1e-4
    assert v["shards"]["wte.weight"] == [[32, 32], [32, 32]] and v["shards"]["h.1.mlp.0.weight"] == [[64, 32], [64, 32]]


def test_a_hugging_face_model_cut_from_its_export_trains_as_one_process(tmp_path):
    """transformers v5's GPT-2, which fx cannot trace, per block through torch.export under FSDP2: the same checks."""
    pytest.importorskip("transformers")
    v = _verdict(tmp_path, "hf")
    assert v["errors"] == [] and v["world"] == 2
    assert v["updates"] == [3, 6, 9, 12] and v["changed"] > 0 and v["grown_random"] > 0
    assert v["max_loss_diff"] <= 1e-5 and v["max_norm_diff"] <= 1e-4
    assert v["shards"]["transformer.h.1.mlp.c_fc.weight"] == [[16, 128], [16, 128]]  # Conv1D: (in, out), rows sharded


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
    assert v["clipped"] == 13 and v["max_norm_diff"] <= 1e-4
    assert v["shards"]["wte.weight"] == [[1, 30], [1, 30], [1, 30], [0, 30]]
    assert v["shards"]["h.0.attn.c_attn.weight"] == [[23, 30], [23, 30], [23, 30], [21, 30]]


@pytest.fixture
def group(tmp_path):
    """A gloo process group of one rank, for this test only."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_fsdp2_is_the_unsharded_run(group):
    """In one process (one rank: the reduce-scatter is a copy) FSDP2 per block trains exactly as the unsharded
    per-block sm: equal losses and masks at every step, through three updates."""
    import copy

    import _models
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    import mst_compile

    cfg = mst_compile.MSTConfig(update_interval=2, sparsity=0.8, final_sparsity=0.6, warmup_end=0.0, ultra_end=0.75)
    torch.manual_seed(0)
    model = _models.tiny_gpt()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (4, 9), generator=g) for _ in range(7)]

    def run(sm, shard):
        if shard:
            for block in sm.get_submodule(sm.meta["mst_blocks"]):
                fully_shard(block)
            fully_shard(sm)
        opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
        sm.mst.attach(opt)
        losses, masks = [], []
        for b in data:
            logits = sm(b[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            m = sm.mst.masks()
            masks.append({n: (t.full_tensor() if shard else t).clone() for n, t in m.items()})  # one rank: a view
        return losses, masks

    plain = run(mst_compile.sparsify(copy.deepcopy(model), cfg, total_steps=7, seed=3, blocks="auto"), False)
    sharded = run(mst_compile.sparsify(model, cfg, total_steps=7, seed=3, blocks="auto"), True)
    assert sharded[0] == pytest.approx(plain[0], abs=1e-6)
    for step, (a, b) in enumerate(zip(sharded[1], plain[1]), 1):
        assert all(torch.equal(a[n], b[n]) for n in b), step
    assert not torch.equal(plain[1][0][next(iter(plain[1][0]))], plain[1][-1][next(iter(plain[1][0]))])
