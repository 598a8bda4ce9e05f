"""One rank of the DDP test (launched by tests/runtime/test_scheduler_ddp.py under torchrun, gloo on CPU).

Each rank initialises its model differently and reads different data; DDP broadcasts rank 0's
weights and masks, MST averages the dense gradients before every update. At the end rank 0 gathers
every rank's masks, weights, generator state and the gradients each update scored, checks them and
writes a JSON verdict to the path given as the first argument; a second argument is MSTConfig.tile
(tile-structured masks on the blocked CPU kernel).
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _models import tiny_gpt
from _torchrun import end_rank
from torch.nn.parallel import DistributedDataParallel as DDP

import mst_compile
from mst_compile.ops.tile_layout import is_tile_constant

STEPS, DT = 13, 3  # updates after steps 3, 6, 9, 12 (none after the last step)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def main(out_path: str, tile: int | None = None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100 + rank)  # different on purpose: DDP must hand every rank rank 0's state
    cfg = mst_compile.MSTConfig(update_interval=DT, sparsity=0.8, final_sparsity=0.6,
                                warmup_end=0.0, ultra_end=0.75, grow_gradient_fraction=0.75,
                                # tiles: few per weight, so a falling sparsity makes every update grow some by gradient
                                schedule=None if tile is None else [(0, 0.8), (STEPS, 0.3)],
                                tile=tile, sparse_kernel="auto" if tile is None else "tile")
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=STEPS, seed=7)
    ddp = DDP(sm)  # broadcast_buffers=True (the default): the bool masks travel too
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sm.mst.attach(opt)

    sched = sm.mst._scheduler
    scored: list[tuple[dict, dict]] = []  # (local dense grads, what the update scored) per update
    average = sched._dense_grads

    def spy():
        local = {n: sw.dense_grad().clone() for n, sw in sm.mst.sparse_weights().items() if sw.dense_grad() is not None}
        used = average()
        scored.append((local, {n: g.clone() for n, g in used.items() if g is not None}))
        return used

    sched._dense_grads = spy
    start = {n: m.clone() for n, m in sm.mst.masks().items()}
    g = torch.Generator().manual_seed(rank)
    grown_random = 0
    for _ in range(STEPS):
        batch = torch.randint(0, 64, (4, 17), generator=g)
        logits = ddp(batch[:, :-1])  # (B, T, vocab)
        F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if sm.mst.step_count % DT == 0:
            grown_random += sm.mst.last_update["grown_random"]

    errors = []
    edges = {n: s.sparse.tile for n, s in sm.mst.weight_sites.items()}  # the tied embedding keeps element masks
    assert tile is None or sorted(n for n, b in edges.items() if b != tile) == ["wte.weight"], edges
    for n, m in sm.mst.masks().items():
        if edges[n] is not None and not is_tile_constant(m, tile):
            errors.append(f"mask {n} is not constant on its {tile}x{tile} tiles")
        if len({bytes(x.to(torch.uint8).numpy()) for x in _gather(m.to(torch.uint8))}) != 1:
            errors.append(f"mask {n} differs across ranks")
    for n, p in sm.named_parameters():
        if not all(torch.equal(x, p.detach()) for x in _gather(p.detach())):
            errors.append(f"weight {n} differs across ranks")
    if not all(torch.equal(x, sched._generator.get_state()) for x in _gather(sched._generator.get_state())):
        errors.append("random-growth generator state differs across ranks")
    for k, (local, used) in enumerate(scored):
        if set(local) != set(used) or not local:
            errors.append(f"update {k}: scored {sorted(used)} but formed dense gradients for {sorted(local)}")
        for n in local:
            locals_ = _gather(local[n])
            if not all(torch.equal(x, used[n]) for x in _gather(used[n])):
                errors.append(f"update {k}: scored gradient of {n} differs across ranks")
            if not torch.allclose(used[n], sum(locals_) / world, rtol=1e-5, atol=1e-7):
                errors.append(f"update {k}: scored gradient of {n} is not the mean of the ranks' gradients")
            if rank == 0 and torch.equal(locals_[0], locals_[1]):
                errors.append(f"update {k}: ranks saw identical gradients for {n}; the test data must differ")
    changed = sum(int((m != start[n]).sum()) for n, m in sm.mst.masks().items())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"errors": errors[:20], "updates": len(scored), "changed": changed,
                       "grown_random": grown_random, "world": world}, f)
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
