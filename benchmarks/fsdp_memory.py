"""Memory per rank of MST under FSDP2: a ~54M-parameter GPT sharded per block on 1, 2 and 4 gloo ranks (CPU).

    PYTHONPATH=. python benchmarks/fsdp_memory.py [--ranks 1,2,4] [--out benchmarks/results/fsdp]

For each rank count it launches ``torchrun --nproc_per_node N`` of this file (``--worker``): each rank
builds examples/tiny_gpt.py's GPT (d=512, 12 layers, vocabulary 32000 tied, 54.2M parameters),
``sparsify(..., blocks="auto")``, ``fully_shard`` on every rewritten block and on ``sm``, AdamW, ``attach``,
and trains 3 steps (a topology update after step 2). Then it counts, on its own rank, the bytes it holds:
parameters (the local shards), masks (the local slices; the exploration record beside them), optimizer
state (AdamW's exp_avg and exp_avg_sq, local shards, and its step counters), and its peak RSS
(``resource.getrusage``). Writes ``memory.{md,json}`` to ``--out``: per rank count the largest rank's
figures and their ratio to the one-rank run's.

What falls as 1/N is the state held between steps. The peak RSS does not: every rank builds the whole
model and its masks before ``fully_shard`` (capture and the initial masks need real weights), and the
topology update gathers one whole tensor at a time (docs/design.md §4, "Memory").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab_size": 32000, "block_size": 64, "n_layer": 12, "n_head": 8, "n_embd": 512}
BATCH, LENGTH, STEPS = 1, 32, 3  # per rank: the activations stay small next to the state measured
MB = 2**20


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _rss_now() -> int:
    """This process's resident set now (bytes; 0 where /proc is missing), after handing the allocator's free
    pages back to the system (glibc keeps them otherwise, and the RSS would count memory no tensor holds)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker(out: str) -> None:
    """One rank: build, shard, train STEPS steps, count what this rank holds; rank 0 writes every rank's figures."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard

    import mst_compile
    from mst_compile.runtime.sharding import local

    sys.path.insert(0, str(ROOT / "examples"))
    from tiny_gpt import GPT

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(**SHAPE, flash=True)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = mst_compile.MSTConfig(update_interval=2, sparsity=0.8, final_sparsity=0.6, warmup_end=0.0, ultra_end=0.75)
    t0 = time.time()
    sm = mst_compile.sparsify(model, cfg, blocks="auto", total_steps=STEPS + 1, seed=0)
    for block in sm.get_submodule(sm.meta["mst_blocks"]):
        fully_shard(block)
    fully_shard(sm)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        batch = torch.randint(0, SHAPE["vocab_size"], (BATCH, LENGTH + 1), generator=g)
        logits = sm(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sched = sm.mst._scheduler
    moments = [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    mine = {
        "rank": rank,
        "params": _nbytes(local(p) for p in sm.parameters()),
        "masks": _nbytes(s.mask for s in sm.mst.weight_sites.values()),
        "exploration_record": _nbytes((sched._ever or {}).values()),
        "optimizer_state": _nbytes(local(v) for v in moments),
        "optimizer_steps": _nbytes(v for s in opt.state.values() for k, v in s.items() if k == "step"),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: kilobytes
        "rss_now": _rss_now(),
    }
    mine["total"] = mine["params"] + mine["masks"] + mine["optimizer_state"]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        info = {"world": world, "parameters": n_params, "updates": sm.mst.last_update is not None,
                "density": sm.mst.density(), "seconds": time.time() - t0, "ranks": gathered}
        Path(out).write_text(json.dumps(info, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _table(results: list[dict], command: str) -> str:
    one = max(r["total"] for r in results[0]["ranks"])
    lines = ["# MST under FSDP2: memory per rank", "",
             f"GPT d={SHAPE['n_embd']}, {SHAPE['n_layer']} layers, vocabulary {SHAPE['vocab_size']} tied "
             f"({results[0]['parameters'] / 1e6:.1f}M parameters), captured per block and sharded by `fully_shard` per "
             f"block and at the root; gloo on CPU, {STEPS} AdamW steps with a topology update after step 2. Bytes this "
             "rank holds after the last step (the largest rank; MiB):", "",
             "| ranks | params | masks | optimizer state | total per rank | total / (1-rank total) | x N | RSS at the end | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        big = max(res["ranks"], key=lambda r: r["total"])
        ratio = big["total"] / one
        rss, now = max(r["peak_rss"] for r in res["ranks"]), max(r["rss_now"] for r in res["ranks"])
        lines.append(f"| {res['world']} | {big['params'] / MB:.1f} | {big['masks'] / MB:.1f} | {big['optimizer_state'] / MB:.1f} "
                     f"| {big['total'] / MB:.1f} | {ratio:.3f} | {ratio * res['world']:.3f} | {now / MB:.0f} | {rss / MB:.0f} |")
    lines += ["", "params: local shards of every parameter (fp32); masks: local slices of the masks (1 byte per weight "
              "of the sparse weights); optimizer state: local shards of AdamW's exp_avg and exp_avg_sq. Beside them "
              "(not in the total): the exploration record, 1 byte per sparse weight like the masks once exploration "
              "starts, and AdamW's step counters (a few bytes). `x N` is the ratio times the rank count: 1.000 is an "
              "exact 1/N; above 1 are the rows that do not divide evenly.",
              "", "RSS at the end (the process's resident memory after `malloc_trim`, largest rank) counts more than the "
              "state: torch itself and its libraries, the captured graphs, the allocator's fragmentation. "
              f"{_falls(results)}"
              "The peak RSS does not fall as 1/N: every rank builds the whole model and its masks before "
              "`fully_shard` (capture and the initial masks need real weights), the first forward and the topology "
              "update gather whole tensors, and each process carries torch itself (~300 MiB).",
              "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _falls(results: list[dict]) -> str:
    """How far the RSS at the end falls from one rank count to the next, beside the state's fall."""
    top = [(r["world"], max(x["rss_now"] for x in r["ranks"]), max(x["total"] for x in r["ranks"])) for r in results]
    steps = [f"{a[0]} to {b[0]} ranks: {(a[1] - b[1]) / MB:.0f} MiB (the state: {(a[2] - b[2]) / MB:.0f} MiB)"
             for a, b in zip(top, top[1:])]
    return f"It falls with the state: {'; '.join(steps)}. " if steps else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    results = []
    for n in [int(r) for r in args.ranks.split(",")]:
        part = out / f"ranks-{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
               "--worker", str(part)]
        subprocess.run(cmd, env=env, check=True)
        results.append(json.loads(part.read_text()))
        part.unlink()
        big = max(results[-1]["ranks"], key=lambda r: r["total"])
        print(f"{n} rank(s): {big['total'] / MB:.1f} MiB per rank ({results[-1]['seconds']:.0f} s)", flush=True)
    command = f"PYTHONPATH=. python benchmarks/fsdp_memory.py --ranks {args.ranks}"
    (out / "memory.json").write_text(json.dumps({"command": command, "shape": SHAPE, "steps": STEPS, "results": results},
                                                indent=1) + "\n")
    (out / "memory.md").write_text(_table(results, command))
    print((out / "memory.md").read_text())


if __name__ == "__main__":
    main()
