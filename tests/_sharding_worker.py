"""One rank of the sharding test (launched by tests/runtime/test_sharding.py under torchrun, gloo on CPU).

On two ranks each rank holds real shards, which one rank cannot show. Every sharded setup is tried
and what it raised is recorded as "Type: message" ("no error" for the documented FSDP2 order, which
also trains one step); rank 0 writes {case: [rank 0's, rank 1's]} as JSON to the path given as the
first argument.
"""
import json
import sys

import torch
import torch.distributed as dist
from _models import MLP, tiny_gpt
from _torchrun import end_rank
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

import mst_compile


def fsdp2_before():
    m = tiny_gpt()
    for block in m.h:
        fully_shard(block)
    mst_compile.sparsify(fully_shard(m), total_steps=8)


def fsdp2_after():
    """Whole-model capture: sm's blocks are plain Modules of the hierarchy, not rewritten blocks."""
    sm = mst_compile.sparsify(tiny_gpt(), total_steps=8, blocks=None)
    for block in sm.h.children():  # a GraphModule keeps the hierarchy in plain Modules
        fully_shard(block)
    sm.mst.attach(torch.optim.AdamW(fully_shard(sm).parameters()))


def fsdp2_documented():
    """The supported order: per-block capture (the default), fully_shard per rewritten block, then sm, then attach."""
    sm = mst_compile.sparsify(tiny_gpt(), total_steps=8)
    for block in sm.h:
        fully_shard(block)
    opt = torch.optim.AdamW(fully_shard(sm).parameters())
    sm.mst.attach(opt)
    sm(torch.randint(0, 64, (2, 8))).square().mean().backward()
    opt.step()
    assert sm.mst.step_count == 1


def fsdp1_after(use_orig_params=False):
    sm = mst_compile.sparsify(MLP(), total_steps=8)
    wrapped = FullyShardedDataParallel(sm, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    sm.mst.attach(torch.optim.SGD(wrapped.parameters(), lr=0.1))


CASES = {"fsdp2_before": fsdp2_before, "fsdp2_after": fsdp2_after, "fsdp2_documented": fsdp2_documented,
         "fsdp1_after": fsdp1_after,
         "fsdp1_orig_params_after": lambda: fsdp1_after(use_orig_params=True)}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    seen = {}
    for name, case in CASES.items():
        try:
            case()
            seen[name] = "no error"
        except Exception as e:  # what each setup raises is the verdict
            seen[name] = f"{type(e).__name__}: {e}"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({name: [s[name] for s in everyone] for name in CASES}, f)
    end_rank()


if __name__ == "__main__":
    main(sys.argv[1])
