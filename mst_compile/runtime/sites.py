"""The site table: one ``WeightSite`` per sparse weight, and what the runtime does to all of them.

The handle builds the table from what the linear pass rewrote and hands the same dict to the
scheduler and the ledger, so each of them reads the parameter, its mask and its cached density
from one place instead of from the handle's internals. Masks only change through
``keep_largest``, ``SparseWeight.set_mask`` followed by ``refresh``, so the cached densities and
the kernel choice of each site always follow the current mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..ops.sparse_linear import SparseWeight
from ..ops.tile_layout import expand, is_tile_constant, not_tiled_message, tile_norms
from .density import allocate
from .sharding import gathered, local


@dataclass(eq=False)
class WeightSite:
    """One sparse weight: the parameter, its ``SparseWeight`` (mask, probe, kernel) and how many graph
    nodes use it (2 for a tied head read twice). ``density`` caches active / numel of the mask: the
    ledger reads it at every step and counting a mask each time would cost a reduction per weight."""

    name: str
    param: nn.Parameter
    sparse: SparseWeight
    uses: int = 1
    density: float = 1.0

    def __post_init__(self) -> None:
        self.density = self.sparse.active() / self.sparse.numel

    @property
    def mask(self) -> torch.Tensor:
        return self.sparse.mask

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    def active(self) -> int:
        return self.sparse.active()

    def active_units(self) -> int:
        """Active tiles of a tile-structured weight, else active weights: what allocation counts."""
        return self.sparse.active_units()


Sites = dict[str, WeightSite]


def allocation(sites: Sites, sparsity: float, distribution: str) -> dict[str, int]:
    """Active count per weight (tiles, for tile-structured masks) for a global ``sparsity`` under
    ``distribution`` (docs/design.md §2, §9)."""
    return allocate({n: s.shape for n, s in sites.items()}, sparsity, distribution, {n: s.sparse.tile for n, s in sites.items()})


def units(sites: Sites) -> dict[str, int]:
    """What each weight's allocation counts: its tiles, or its weights."""
    return {n: s.sparse.units for n, s in sites.items()}


def overall_density(sites: Sites) -> float:
    """Active / total over all sparse weights (1.0 with none)."""
    total = sum(s.sparse.numel for s in sites.values())
    return sum(s.active() for s in sites.values()) / total if total else 1.0


def refresh(sites: Sites, kernel_setting: str) -> None:
    """After any mask change: re-cache every density and let each site re-pick its linear kernel."""
    for s in sites.values():
        s.density = s.active() / s.sparse.numel if s.sparse.numel else 1.0
        s.sparse.select_kernel(kernel_setting)


@torch.no_grad()
def apply_masks(sites: Sites) -> None:
    """Zero every masked weight (the invariant the sparse op relies on); sharded: each local shard by
    its slice of the mask."""
    if sites:  # one fused call: this runs after every optimizer step
        torch._foreach_mul_([local(s.param) for s in sites.values()], [s.mask for s in sites.values()])


@torch.no_grad()
def keep_largest(sites: Sites, counts: dict[str, int], kernel_setting: str) -> None:
    """Mask each weight to its ``counts[name]`` largest-magnitude entries (tiles of largest L2 norm,
    for tile-structured masks) and zero the rest. Sharded: scored on the whole weight, gathered one
    tensor at a time (a collective), each rank keeping its slice."""
    for name, count in counts.items():
        s = sites[name]
        param, tile = gathered(s.param), s.sparse.tile
        scores = param.detach().abs() if tile is None else tile_norms(param, tile)
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=param.device)
        if count:
            mask[torch.topk(scores.flatten(), count, sorted=False).indices] = True
        mask = mask.view_as(scores) if tile is None else expand(mask.view_as(scores), s.shape, tile)
        s.sparse.set_mask(mask)
        local(s.param).mul_(s.mask)
    refresh(sites, kernel_setting)


def check_masks(sites: Sites, masks: Any) -> None:
    """Raise ``CheckpointError`` unless a checkpoint's ``masks`` fit the site table: one bool tensor per
    weight, of the weight's shape, constant on its tiles for tile-structured masks."""
    if not isinstance(masks, dict):
        raise CheckpointError(f"sm.mst.load_state_dict: 'masks' must be a dict of name -> bool tensor, got {type(masks).__name__}")
    missing = [n for n in sites if n not in masks]
    extra = [n for n in masks if n not in sites]
    if missing or extra:
        raise CheckpointError(
            f"sm.mst.load_state_dict: the checkpoint's masks do not fit this model: missing masks for {missing}, "
            f"masks for weights the model does not have: {extra}"
        )
    bad = []
    for n, s in sites.items():
        if not isinstance(masks[n], torch.Tensor) or tuple(masks[n].shape) != s.shape:
            shape = tuple(masks[n].shape) if isinstance(masks[n], torch.Tensor) else type(masks[n]).__name__
            bad.append(f"the mask of weight '{n}' has shape {shape} in the checkpoint, but the model's weight "
                       f"has shape {s.shape}")
        elif s.sparse.tile is not None and not is_tile_constant(masks[n].bool(), s.sparse.tile):
            bad.append(not_tiled_message(n, masks[n], s.sparse.tile))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError("sm.mst.load_state_dict: " + "; ".join(bad[:3]) + more)
