"""Sharded training is refused: mst_compile supports DDP only (docs/design.md §4, "Distributed").

MST keeps one mask per whole parameter and re-masks the tensors its site table holds. FSDP1
(``FullyShardedDataParallel``), FSDP2 (``fully_shard``, DTensor parameters) and DeepSpeed ZeRO-3
flatten, replace or partition those parameters: capture fails on them (or captures shards), and
sharding after ``sparsify`` leaves the masks on stale tensors, which trains silently wrong. So ``sparsify`` refuses
a sharded model, and ``sm.mst.attach`` and every MST step refuse a module sharded after it, in one line.

The FSDP and DTensor classes are looked up in ``sys.modules``, never imported (importing them is
slow): a model can hold their objects only once its owner has imported them.
"""
from __future__ import annotations

import sys

from torch import nn

from ..errors import MstCompileError

SUPPORTED = ("mst_compile supports DDP only: sparsify the unsharded model first, then wrap the returned module in "
             "DistributedDataParallel; FSDP, FSDP2 (fully_shard) and DeepSpeed ZeRO-3 sharding are not supported yet")

_MARKS = {"_fsdp_flattened": "flattened by FullyShardedDataParallel (FSDP1)",  # set on every parameter FSDP1 manages
          "ds_id": "partitioned by DeepSpeed ZeRO-3 (it carries ds_id)",
          "ds_status": "partitioned by DeepSpeed ZeRO-3 (it carries ds_status)"}

Slot = tuple[str, nn.Module, str, nn.Parameter]  # (weight name, module that registers it, attribute, parameter)


def sharding_seen(module: nn.Module, called: str = "the model") -> str | None:
    """What shards ``module`` (``called`` so in the words), the first FSDP module or sharded parameter found, else None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        for name, m in module.named_modules():
            place = f"submodule {name!r}" if name else called
            if isinstance(m, fsdp.FSDPModule):
                return f"{place} ({type(m).__name__}) was sharded by fully_shard (FSDP2)"
            if isinstance(m, fsdp.FullyShardedDataParallel):
                return f"{place} is a FullyShardedDataParallel wrapper (FSDP1)"
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    for name, p in module.named_parameters():
        if dtensor is not None and isinstance(p, dtensor):
            return f"parameter {name!r} is a DTensor (sharded by fully_shard (FSDP2) or tensor parallelism)"
        mark = next((m for m in _MARKS if m in vars(p)), None)
        if mark is not None:
            return f"parameter {name!r} is {_MARKS[mark]}"
    return None


def refuse_sharded(module: nn.Module, where: str, called: str = "the model") -> None:
    """Raise ``MstCompileError`` in one line if ``module`` is sharded (``where``: the verb that checks)."""
    seen = sharding_seen(module, called)
    if seen is not None:
        raise MstCompileError(f"{where}: {seen}; {SUPPORTED}")


def slots(module: nn.Module, params: dict[str, nn.Parameter]) -> list[Slot]:
    """Where ``module`` registers each sparse weight, for :func:`check_slots` to look at after every step."""
    out = []
    for name, param in params.items():
        owner, _, attr = name.rpartition(".")
        out.append((name, module.get_submodule(owner), attr, param))
    return out


def check_slots(module: nn.Module, table: list[Slot], where: str) -> None:
    """Refuse in one line once a sparse weight is no longer the plain parameter ``module`` registers
    (replaced, flattened or partitioned after ``sparsify``). A dict lookup per weight: it runs every step."""
    for name, owner, attr, param in table:
        if owner._parameters.get(attr) is not param or not _MARKS.keys().isdisjoint(vars(param)):
            seen = sharding_seen(module, "sm") or (f"the sparse weight {name!r} is no longer the parameter sm registers: "
                                                   "it was replaced after sparsify, so its mask would go to a stale tensor")
            raise MstCompileError(f"{where}: {seen}; {SUPPORTED}")
