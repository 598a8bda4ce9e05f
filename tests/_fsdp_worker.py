"""One rank of the FSDP2 tests (launched by tests/runtime/test_fsdp.py under torchrun, gloo on CPU).

``python _fsdp_worker.py OUT MODE [CKPT]``; MODE is one of

- ``match``: per-block FSDP2 (``fully_shard`` on every rewritten block, then on ``sm``) trains a tiny GPT
  with a tied head next to the single-process run of the same model, seed and data (every rank runs
  that reference too, attached to a one-rank group: nothing is averaged). The global batch is split
  across ranks; FSDP2 averages the gradients, so each step equals the reference's full-batch step.
- ``resume``: the FSDP2 run saved with torch.distributed.checkpoint at step K and resumed in a fresh
  model, optimizer and MST state against the uninterrupted FSDP2 run.
- ``accumulate``: ``match`` with two micro-batches per step on each rank, each reduce-scattered and masked
  as it comes (the probe step's dense gradient must still be the sum of both).
- ``hf``: ``match`` on a Hugging Face GPT-2 (tied head), which fx cannot trace: blocks cut from its
  torch.export graph.
- ``uneven``: ``match`` on 4 ranks and a GPT whose weights' rows do not divide by them (shorter shards,
  and an empty one of the tied embedding), with grown weights drawn from N(0, σ²).

Rank 0 writes a JSON verdict (errors, losses, updates compared) to OUT; every rank checks its own
shards (masked entries exactly zero in weights and Adam moments) and sends its errors along.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from _models import hf_gpt2, load_example
from _torchrun import end_rank
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

import mst_compile
from mst_compile.config import Ablation

STEPS, DT, K = 13, 3, 8  # updates after steps 3, 6, 9, 12; the resume saves after step 8 (step 9 is a probe step)
VOCAB, BATCH = 64, 8
CLIP = 0.2  # gradient-norm clipping, active at most steps: it must see the masked gradients, as the reference does


def gpt(uneven: bool):
    """The tiny GPT (tied head) of tests/_models.py; ``uneven``: weights of 3, 90, 30 and 120 rows, which 4 ranks
    shard unevenly: the tied 3-row embedding and head leaves rank 3 an empty shard, 90 rows are 23, 23, 23, 21."""
    GPT = load_example("tiny_gpt").GPT
    if uneven:
        return GPT(vocab_size=3, block_size=5, n_layer=2, n_head=2, n_embd=30)
    return GPT(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)


def config(uneven: bool):
    return mst_compile.MSTConfig(update_interval=DT, sparsity=0.8, final_sparsity=0.6, warmup_end=0.0, ultra_end=0.75,
                                 grow_gradient_fraction=0.75,
                                 ablation=Ablation(grow_init_scale=0.5) if uneven else Ablation())


def batches(vocab: int, length: int):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (BATCH, length + 1), generator=g) for _ in range(STEPS)]


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8).full_tensor().bool() if t.dtype == torch.bool else t.full_tensor()


def loss_of(model, batch):
    out = model(batch[:, :-1])
    logits = getattr(out, "logits", out)  # (B, T, vocab); a Hugging Face model returns an output object
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def reference(model, cfg, data, group, example=None):
    """The single-process run: losses per step, the masks and update report after every update, the final
    weights and the FLOPs the ledger charged."""
    sm = mst_compile.sparsify(model, cfg, total_steps=STEPS, seed=7, example_inputs=example)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt, process_group=group)
    losses, masks, norms = [], {}, []
    for step, batch in enumerate(data, 1):
        loss = loss_of(sm, batch)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(sm.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % DT == 0:
            masks[step] = {n: m.clone() for n, m in sm.mst.masks().items()}
            masks[step]["report"] = dict(sm.mst.last_update)
    return losses, masks, {n: p.detach().clone() for n, p in sm.named_parameters()}, sm.mst.flops.mst_total, norms


def sharded(model, cfg, example=None):
    """sparsify per block, fully_shard every rewritten block then sm, AdamW over sm.parameters(), attach."""
    sm = mst_compile.sparsify(model, cfg, blocks="auto", total_steps=STEPS, seed=7, example_inputs=example)
    assert "mst_blocks" in sm.meta, sm.meta.get("mst_whole_why")
    for block in sm.get_submodule(sm.meta["mst_blocks"]):
        fully_shard(block)
    fully_shard(sm)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    return sm, opt


def check_shards(sm, opt, where: str) -> list[str]:
    """Every sparse weight a DTensor whose local shard (and Adam moments) is exactly zero where masked."""
    errors = []
    for name, site in sm.mst.weight_sites.items():
        p = site.param
        if not isinstance(p, DTensor) or p is not sm.get_parameter(name):
            errors.append(f"{where}: {name} is not the DTensor sm registers")
            continue
        off = ~site.mask
        if bool(p.to_local()[off].ne(0).any()):
            errors.append(f"{where}: {name} has non-zero weights at masked entries on rank {dist.get_rank()}")
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, DTensor) and v.shape == p.shape and bool(v.to_local()[off].ne(0).any()):
                errors.append(f"{where}: {name}'s {key} is non-zero at masked entries on rank {dist.get_rank()}")
    return errors


def train(sm, opt, data, steps, manual=False, micro=1):
    """FSDP2 steps over this rank's share of each global batch, in ``micro`` micro-batches: (global losses,
    masks after each update, errors)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, masks, errors, norms = [], {}, [], []
    for batch in data[steps[0] - 1:steps[-1]]:
        loss = 0.0
        for part in batch.chunk(world)[rank].chunk(micro):
            part_loss = loss_of(sm, part) / micro
            part_loss.backward()
            loss += part_loss.detach()
        norms.append(float(torch.nn.utils.clip_grad_norm_(sm.parameters(), CLIP)))  # a DTensor norm: over all ranks
        opt.step()
        if manual:
            sm.mst.step()
        opt.zero_grad()
        total = loss.clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        step = sm.mst.step_count
        errors += check_shards(sm, opt, f"step {step}")
        if step % DT == 0:
            masks[step] = {n: whole(m) for n, m in sm.mst.masks().items()}
            masks[step]["report"] = dict(sm.mst.last_update)
    return losses, masks, errors, norms


def compare_masks(got, want, errors):
    for step in want:
        if got[step]["report"] != want[step]["report"]:
            errors.append(f"update at step {step}: sm.mst.last_update {got[step]['report']} differs from the "
                          f"single-process run's {want[step]['report']}")
        for n, m in want[step].items():
            if n != "report" and not torch.equal(got[step][n], m):
                errors.append(f"update at step {step}: mask of {n} differs from the single-process run "
                              f"({int((got[step][n] != m).sum())} entries)")


def match(uneven: bool, micro: int = 1, hf: bool = False):
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group([r]) for r in range(world)]
    torch.manual_seed(0)
    model = hf_gpt2() if hf else gpt(uneven)
    cfg = config(uneven)
    data = batches(VOCAB, 16) if hf else batches(model.wte.num_embeddings, model.block_size if uneven else 16)
    example = {"input_ids": data[0][:, :-1]} if hf else None  # fx cannot trace it: captured per block through torch.export
    ref_losses, ref_masks, ref_weights, ref_flops, ref_norms = reference(copy.deepcopy(model), cfg, data, groups[rank], example)
    sm, opt = sharded(model, cfg, example)
    sm.mst.attach(opt)
    errors = []
    for name, p in sm.named_parameters():
        if not isinstance(p, DTensor) or p.placements != (Shard(0),):
            errors.append(f"parameter {name} is not sharded by FSDP2: {type(p).__name__}")
    if sm.get_parameter("lm_head.weight") is not sm.get_parameter("transformer.wte.weight" if hf else "wte.weight"):
        errors.append("the tied head no longer shares the embedding")
    losses, masks, errs, norms = train(sm, opt, data, range(1, STEPS + 1), micro=micro)
    errors += errs
    compare_masks(masks, ref_masks, errors)
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    norm_diff = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
    if norm_diff > 1e-4:
        errors.append(f"gradient norms differ from the single-process run's by up to {norm_diff:.2e} (relative)")
    if max(diffs) > 1e-5:
        errors.append(f"losses differ from the single-process run by up to {max(diffs):.2e}")
    weights = {n: whole(p.detach()) for n, p in sm.named_parameters()}
    worst = max(float((weights[n] - w).abs().max()) for n, w in ref_weights.items())
    if worst > 1e-4:
        errors.append(f"final weights differ from the single-process run by up to {worst:.2e}")
    flops = torch.tensor([sm.mst.flops.mst_total], dtype=torch.float64)
    dist.all_reduce(flops)  # each rank charges the rows it saw
    if abs(float(flops) - ref_flops) > 1e-9 * ref_flops:
        errors.append(f"the ranks' ledgers charged {float(flops):.6e} FLOPs, the single-process run {ref_flops:.6e}")
    changed = sum(int((masks[STEPS - 1][n] != masks[DT][n]).sum()) for n in masks[DT] if n != "report")
    shards = {n: [tuple(x) for x in gather_shapes(p)] for n, p in sm.named_parameters()}
    return errors, {"losses": losses, "reference": ref_losses, "max_loss_diff": max(diffs), "max_weight_diff": worst,
                    "clipped": sum(n > CLIP for n in ref_norms), "max_norm_diff": norm_diff,
                    "updates": sorted(masks), "changed": changed, "density": sm.mst.density(), "shards": shards,
                    "grown_random": sm.mst.last_update["grown_random"], "world": world}


def gather_shapes(p):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, tuple(p.to_local().shape))
    return out


def resume(ckpt: str):
    torch.manual_seed(0)
    cfg = config(False)
    model = gpt(False)
    data = batches(VOCAB, 16)
    fresh = copy.deepcopy(gpt(False))  # another init: everything must come from the checkpoint
    sm, opt = sharded(copy.deepcopy(model), cfg)
    sm.mst.attach(opt, manual=True)
    full_losses, full_masks, errors, _ = train(sm, opt, data, range(1, STEPS + 1), manual=True)
    final = {n: whole(p.detach()) for n, p in sm.named_parameters()}

    sm, opt = sharded(copy.deepcopy(model), cfg)
    sm.mst.attach(opt, manual=True)
    _, _, errs, _ = train(sm, opt, data, range(1, K + 1), manual=True)
    errors += errs
    msd, osd = get_state_dict(sm, opt)
    dcp.save({"model": msd, "optim": osd, "mst": sm.mst.state_dict()}, checkpoint_id=ckpt)

    sm, opt = sharded(fresh, cfg)
    msd, osd = get_state_dict(sm, opt)  # before attach: its zero-lr step that builds the optimizer state is no MST step
    sm.mst.attach(opt, manual=True)
    state = {"model": msd, "optim": osd, "mst": sm.mst.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(sm, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sm.mst.load_state_dict(state["mst"])
    if sm.mst.step_count != K:
        errors.append(f"resumed at step {sm.mst.step_count}, not {K}")
    errors += check_shards(sm, opt, "after loading")
    losses, masks, errs, _ = train(sm, opt, data, range(K + 1, STEPS + 1), manual=True)
    errors += errs
    if losses != full_losses[K:]:
        errors.append(f"resumed losses {losses} differ from the uninterrupted run's {full_losses[K:]}")
    compare_masks(masks, {s: m for s, m in full_masks.items() if s > K}, errors)
    for n, p in sm.named_parameters():
        if not torch.equal(whole(p.detach()), final[n]):
            errors.append(f"final weight {n} differs from the uninterrupted run")
    return errors, {"losses": losses, "uninterrupted": full_losses[K:], "updates": sorted(masks)}


def main(out_path: str, mode: str, ckpt: str | None = None) -> None:
    dist.init_process_group("gloo")
    errors, info = resume(ckpt) if mode == "resume" else \
        match(mode == "uneven", 2 if mode == "accumulate" else 1, hf=mode == "hf")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, errors)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"errors": [e for errs in everyone for e in errs][:20], **info}, f)
    end_rank()


if __name__ == "__main__":
    main(*sys.argv[1:])
