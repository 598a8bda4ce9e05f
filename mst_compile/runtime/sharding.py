"""Which sharded layouts MST accepts (docs/design.md §4, "Distributed"), and how it reads a sharded tensor.

Supported: DDP (sparsify, then wrap ``sm``) and FSDP2 in one order: ``sparsify(model, cfg, blocks=...)``,
``fully_shard`` on rewritten blocks of ``sm``, ``fully_shard(sm)``, then ``sm.mst.attach(optimizer)``,
which re-binds the site table to FSDP2's DTensor parameters (``runtime/fsdp.py``). Everything else is
refused in one line naming what was seen: FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO-3,
which flatten or partition parameters; a model sharded before ``sparsify`` (capture would see shards);
``fully_shard`` on a module that is neither a rewritten block nor ``sm``, or on blocks without ``sm``
itself (the top-level weights would train unsynchronised); DTensor parameters without FSDP2 (tensor
parallelism); and a sparse weight replaced after ``attach``, whose mask would go to a stale tensor.

The FSDP and DTensor classes are looked up in ``sys.modules``, never imported (importing them is
slow): a model can hold their objects only once its owner has imported them.
"""
from __future__ import annotations

import sys

from torch import Tensor, nn

from ..constants import BLOCKS_META, WHOLE_META
from ..errors import MstCompileError

SUPPORTED = ("supported: DDP (sparsify the unsharded model, then wrap sm in DistributedDataParallel) or FSDP2 in this "
             "order: sm = sparsify(model, config, blocks='auto'), fully_shard(block) for each block of sm, "
             "fully_shard(sm), the optimizer over sm.parameters(), sm.mst.attach(optimizer); FSDP1 and DeepSpeed "
             "ZeRO-3 are not supported")

_MARKS = {"_fsdp_flattened": "flattened by FullyShardedDataParallel (FSDP1)",  # set on every parameter FSDP1 manages
          "ds_id": "partitioned by DeepSpeed ZeRO-3 (it carries ds_id)",
          "ds_status": "partitioned by DeepSpeed ZeRO-3 (it carries ds_status)"}

Slot = tuple[str, nn.Module, str, nn.Parameter]  # (weight name, module that registers it, attribute, parameter)


def is_dtensor(t) -> bool:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view that writes through), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def gathered(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (all-gathered: a collective every rank must call), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def _fsdp():
    return sys.modules.get("torch.distributed.fsdp")


def sharding_seen(module: nn.Module, called: str = "the model") -> str | None:
    """What shards ``module`` (``called`` so in the words), the first FSDP module or sharded parameter found, else None."""
    fsdp = _fsdp()
    if fsdp is not None:
        for name, m in module.named_modules():
            place = f"submodule {name!r}" if name else called
            if isinstance(m, fsdp.FSDPModule):
                return f"{place} ({type(m).__name__}) was sharded by fully_shard (FSDP2)"
            if isinstance(m, fsdp.FullyShardedDataParallel):
                return f"{place} is a FullyShardedDataParallel wrapper (FSDP1)"
    for name, p in module.named_parameters():
        if is_dtensor(p):
            return f"parameter {name!r} is a DTensor (sharded by fully_shard (FSDP2) or tensor parallelism)"
        mark = next((m for m in _MARKS if m in vars(p)), None)
        if mark is not None:
            return f"parameter {name!r} is {_MARKS[mark]}"
    return None


def refuse_sharded(module: nn.Module, where: str, called: str = "the model") -> None:
    """Raise ``MstCompileError`` in one line if ``module`` is sharded (``where``: the verb that checks)."""
    seen = sharding_seen(module, called)
    if seen is not None:
        raise MstCompileError(f"{where}: {seen}; sparsify the unsharded model; {SUPPORTED}")


def fsdp2_layout(module: nn.Module, where: str) -> bool:
    """True when ``sm`` (``module``) is sharded by FSDP2 in the supported layout, False when it is not
    sharded; raise ``MstCompileError`` in one line for every other layout."""
    fsdp = _fsdp()
    for name, m in module.named_modules():
        if fsdp is not None and isinstance(m, fsdp.FullyShardedDataParallel):
            raise MstCompileError(f"{where}: {f'submodule {name!r}' if name else 'sm'} is a FullyShardedDataParallel "
                                  f"wrapper (FSDP1); {SUPPORTED}")
    for name, p in module.named_parameters():
        mark = next((m for m in _MARKS if m in vars(p)), None)
        if mark is not None:
            raise MstCompileError(f"{where}: parameter {name!r} is {_MARKS[mark]}; {SUPPORTED}")
    sharded = [] if fsdp is None else [(n, m) for n, m in module.named_modules() if isinstance(m, fsdp.FSDPModule)]
    if not sharded:
        seen = sharding_seen(module, "sm")
        if seen is not None:  # DTensor parameters without FSDP2
            raise MstCompileError(f"{where}: {seen}, without fully_shard; {SUPPORTED}")
        return False
    if sharded[0][0] != "":
        raise MstCompileError(f"{where}: submodule {sharded[0][0]!r} ({type(sharded[0][1]).__name__}) was sharded by "
                              "fully_shard but sm itself was not, so its other weights would train unsynchronised: "
                              f"call fully_shard(sm) after the blocks; {SUPPORTED}")
    path = getattr(module, "meta", {}).get(BLOCKS_META)
    blocks = set() if path is None else {f"{path}.{i}" for i in range(len(module.get_submodule(path)))}
    for name, m in sharded[1:]:
        if name not in blocks:
            what = f"the rewritten blocks {path}.0 ... {path}.{len(blocks) - 1}" if blocks else \
                (f"a rewritten block (sm was captured whole: {getattr(module, 'meta', {}).get(WHOLE_META, 'blocks=None')}; "
                 "sparsify(..., blocks='<path of the ModuleList>') keeps the blocks or says why not)")
            raise MstCompileError(f"{where}: submodule {name!r} ({type(m).__name__}) was sharded by fully_shard, but it is "
                                  f"neither sm nor {what}; {SUPPORTED}")
    return True


def slots(module: nn.Module, params: dict[str, nn.Parameter]) -> list[Slot]:
    """Where ``module`` registers each sparse weight, for :func:`check_slots` to look at after every step."""
    out = []
    for name, param in params.items():
        owner, _, attr = name.rpartition(".")
        out.append((name, module.get_submodule(owner), attr, param))
    return out


def check_slots(module: nn.Module, table: list[Slot], where: str) -> None:
    """Refuse in one line once a sparse weight is no longer the parameter ``module`` registers
    (replaced, flattened or partitioned after ``attach``). A dict lookup per weight: it runs every step."""
    for name, owner, attr, param in table:
        if owner._parameters.get(attr) is not param or not _MARKS.keys().isdisjoint(vars(param)):
            seen = None if is_dtensor(param) else sharding_seen(module, "sm")
            seen = f"{seen} after sm.mst.attach" if seen else (
                f"the sparse weight {name!r} is no longer the parameter sm registers: it was replaced after "
                f"{'sm.mst.attach' if is_dtensor(param) else 'sparsify'}, so its mask would go to a stale tensor")
            raise MstCompileError(f"{where}: {seen}; {SUPPORTED}")
