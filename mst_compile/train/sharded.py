"""``mstc train --fsdp``: FSDP2 per block instead of DDP replicas (docs/design.md §4, "mstc train --fsdp").

The run is built in the one order MST supports under FSDP2 (``runtime/sharding.py``): capture per
block (``sparsify(..., blocks="auto")``), ``fully_shard`` on every rewritten block, then on ``sm``,
the optimizer over the sharded parameters, ``attach``. Each rank then holds its row slices of the
parameters, gradients, Adam moments and masks; the loop is the DDP one without ``no_sync`` (FSDP2
reduce-scatters every micro-batch and MST masks each shard as it arrives).

Checkpoints stay consolidated: every rank joins the gather and rank 0 writes the same file a DDP or
single-process run writes (whole model state dict, the optimizer state keyed by parameter index,
``sm.mst.state_dict(whole=True)``), so export, ``mst_compile.load`` and ``--resume`` read it
unchanged, on any number of ranks, sharded or not. A resume scatters it back: every rank reads the
file and keeps its slices (``set_state_dict`` with the full state; the whole masks sliced by
``sm.mst.load_state_dict``).
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ..constants import BLOCKS_META
from ..errors import MstCompileError
from ..runtime.sharding import local
from .options import flag_for


def refuse_options(tc, mst) -> None:
    """``--fsdp`` with an option it cannot run is one line naming the flag."""
    if tc.dense:
        raise MstCompileError("--fsdp with --dense: the dense baseline is captured as one graph, with no blocks to shard; "
                              "drop --fsdp (under torchrun the dense baseline trains as DDP replicas)")
    if mst.tile is not None:
        raise MstCompileError(f"--fsdp with {flag_for('tile')} {mst.tile}: tile-structured masks are not supported under "
                              f"FSDP2; drop {flag_for('tile')} or --fsdp")
    if tc.precision == "fp16":
        raise MstCompileError("--fsdp with --precision fp16: the grad scaler would find overflows in each rank's shards "
                              "alone, so the ranks could skip different steps; use --precision bf16, or drop --fsdp")


def check_blocks(model) -> str:
    """The path of the one ``nn.ModuleList`` of blocks that ``blocks="auto"`` finds; refuse a model without it."""
    from ..capture_blocks import find_blocks

    try:
        return find_blocks(model, "auto")[0]
    except ValueError as e:
        found = str(e).removeprefix("sparsify: ").split("; ")[0]
        raise MstCompileError(f"--fsdp shards the model per block, but {found}: drop --fsdp to train DDP replicas, or "
                              "keep the model's blocks in one nn.ModuleList (from your own loop, sparsify(..., "
                              "blocks='<path>') names them: docs/design.md §4)") from None


def shard(sm, device: torch.device) -> None:
    """``fully_shard`` every rewritten block of ``sm``, then ``sm`` itself, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in sm.get_submodule(sm.meta[BLOCKS_META]):
        fully_shard(block, mesh=mesh)
    fully_shard(sm, mesh=mesh)


def parameter_names(sm, opt) -> list[str]:
    """The names of ``opt``'s parameters in its own order; a collective. Called before ``attach`` on a resume:
    it also builds the optimizer state with a zero-lr step, which must not count as an MST step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(sm, opt)
    return [name for g in osd["param_groups"] for name in g["params"]]


def gather_state(sm, opt) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) gathered whole to rank 0's CPU ({} on the other ranks), the
    optimizer's keyed by parameter index as ``Optimizer.state_dict`` keys it; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(sm, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return msd, osd
    index = {name: i for i, name in enumerate(name for g in osd["param_groups"] for name in g["params"])}
    # the hyperparameters as the optimizer itself keeps them (the same on every rank; betas stay a tuple)
    return msd, {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": opt.state_dict()["param_groups"]}


def load_state(sm, opt, model_state: dict, optim_state: dict, names: list[str]) -> None:
    """Scatter a consolidated checkpoint's model and optimizer state (every rank holds it whole) into the
    shards; ``names``: :func:`parameter_names`. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if len(names) != sum(len(g["params"]) for g in optim_state["param_groups"]):
        raise MstCompileError(f"the checkpoint's optimizer holds {sum(len(g['params']) for g in optim_state['param_groups'])} "
                              f"parameters, this run's {len(names)}: it was written by another model")
    by_name = {"state": {names[i]: v for i, v in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_state_dict(sm, opt, model_state_dict=model_state, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(opt.param_groups, optim_state["param_groups"]):  # as saved: the scatter makes tuples lists
        group.update({k: v for k, v in saved.items() if k != "params"})


def first_nonfinite(named_params, d) -> str | None:
    """The first parameter with an inf/NaN entry on any rank's shard or replica (one collective for all of them;
    none in a single process)."""
    named = list(named_params)
    bad = d.all_sum([float(not bool(torch.isfinite(local(p.detach())).all())) for _, p in named])
    return next((n for (n, _), b in zip(named, bad) if b), None)


def ranks_agree(mst, d) -> dict[str, bool]:
    """``ranks_identical`` under FSDP2, where no rank holds whole weights (so they are not compared; gathered,
    every rank would see the same bytes by construction):

    - ``masks``: every rank's slices come from the same whole masks: gathered, each tensor's active count is
      the one every rank computed for it in its own topology updates;
    - ``mst_state``: the state every rank replicates is bit-identical on all: step, growth generator, last update.
    """
    counts = {n: int(s.active()) for n, s in mst.weight_sites.items()}
    gathered = {n: int(m.to(torch.uint8).full_tensor().sum()) for n, m in mst.masks().items()}
    state = mst.state_dict()
    h = hashlib.sha256(repr((state["step"], state["last_update"], sorted(counts.items()))).encode())
    h.update(state["generator"].numpy().tobytes())
    got = d.gather((counts == gathered, h.hexdigest()))
    return {"masks": all(g[0] for g in got), "mst_state": len({g[1] for g in got}) == 1}
