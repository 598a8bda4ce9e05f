"""MST on FSDP2's sharded parameters (docs/design.md §4, "Sharded (FSDP2)").

``follow`` (at ``sm.mst.attach``, once ``runtime/sharding.py`` accepted the layout) re-binds each site
to the DTensor parameter ``sm`` registers now, keeps this rank's slice of its mask (laid out like the
parameter's local shard: same mesh and placements) and hooks the parameter so FSDP2 hands every
reduce-scattered gradient shard to ``SparseWeight.grad_ready``, which masks it before any optimizer
or gradient clipping sees it.

The topology update is the unsharded one, run one tensor at a time: :func:`plan` all-gathers the
weight, its mask and (on probed weights) its dense gradient, runs the same ``mixed_growing`` with the
same shared generator on every rank (so every rank computes the same whole mask from the same
bits, with no broadcast), and keeps this rank's slices. Only one whole tensor is alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import MstCompileError
from .sharding import SUPPORTED, is_dtensor, local
from .sites import Sites, WeightSite
from .topology import TopologyChange, mixed_growing


def follow(module: nn.Module, sites: Sites) -> list:
    """Re-bind every site to the DTensor parameter ``module`` registers now, keep the local slices of
    the masks and hook the gradient shards; returns the hook handles."""
    params = {name: module.get_parameter(name) for name in sites}
    for name, param in params.items():  # check all before changing any
        if not is_dtensor(param):
            raise MstCompileError(f"sm.mst.attach: sm is sharded by fully_shard but the sparse weight {name!r} is not "
                                  f"(a {type(param).__name__}: ignored by fully_shard?); MST under FSDP2 needs every "
                                  f"sparse weight sharded; {SUPPORTED}")
        if param.device_mesh.ndim != 1:
            raise MstCompileError(f"sm.mst.attach: the sparse weight {name!r} is sharded over a {param.device_mesh.ndim}-D "
                                  f"device mesh (HSDP); MST supports FSDP2 over a 1-D mesh only; {SUPPORTED}")
    hooks = []
    for name, site in sites.items():
        site.param = param = params[name]
        site.sparse.shard_like(param)
        hooks.append(param.register_post_accumulate_grad_hook(site.sparse.grad_ready))
    return hooks


def group_of(sites: Sites):
    """The process group the sites' parameters are sharded over."""
    return next(iter(sites.values())).param.device_mesh.get_group()


@dataclass
class ShardedChange:
    """One tensor's update as this rank applies it: ``change`` holds this rank's slices (mask, dropped,
    grown, by_gradient) and the whole tensor's counts."""

    change: TopologyChange
    active: int  # the whole new mask's active count
    grown_total: int = 0
    sigma: float | None = None  # rms of the surviving weights, when grown weights start at N(0, σ²)
    order: Tensor | None = None  # then: each local grown position's index among the whole tensor's grown ones


@torch.no_grad()
def plan(site: WeightSite, count: int, zeta: float, grad_fraction: float, generator: torch.Generator,
         probed: bool, init: bool) -> ShardedChange:
    """Gather one tensor (weight, mask, dense gradient when ``probed``), run the unsharded update on it
    and keep this rank's slices. A collective: every rank calls it for the same sites in the same order."""
    sw = site.sparse
    weight = site.param.full_tensor()  # (R, C)
    mask = sw.full_mask()
    grad = None
    if probed:  # the probed set follows from the masks and schedule alone: the same on every rank
        dense = sw.dense_grad()
        dense = torch.zeros(local(site.param).shape, device=weight.device) if dense is None else dense
        grad = sw.as_dtensor(dense).full_tensor()
    ch = mixed_growing(weight, mask, grad, count, zeta, grad_fraction, generator)
    del grad, mask

    def mine(flat: Tensor) -> Tensor:
        return sw.slice_of(flat.view(weight.shape))

    out = ShardedChange(TopologyChange(mine(ch.mask), mine(ch.dropped), mine(ch.grown), mine(ch.by_gradient),
                                       ch.n_prune, ch.n_grow_gradient, ch.n_grow_random, ch.regrown,
                                       ch.gradient_fallback), int(ch.mask.sum()))
    if init:
        out.grown_total = int(ch.grown.sum())
        kept = ch.mask & ~ch.grown
        if out.grown_total and bool(kept.any()):  # as the unsharded _init_grown decides, on the whole tensor
            out.sigma = float(weight.reshape(-1)[kept].float().pow(2).mean().sqrt())
            out.order = mine(torch.cumsum(ch.grown.long(), 0) - 1)
    return out


@torch.no_grad()
def init_grown(param: Tensor, sc: ShardedChange, scale: float, generator: torch.Generator) -> None:
    """Grown weights at N(0, σ²): the same draws as the unsharded run, each rank writing its own."""
    if sc.sigma is None:
        return
    shard = local(param)
    noise = torch.randn(sc.grown_total, generator=generator, device="cpu").to(device=shard.device, dtype=shard.dtype)
    values = noise * (scale * sc.sigma)
    grown = sc.change.grown.view_as(shard)
    shard[grown] = values[sc.order.view_as(shard)[grown]]


def active_total(masks: list[Tensor], group) -> int:
    """Active entries over every rank's slices of ``masks`` (a collective)."""
    if not masks:
        return 0
    total = torch.stack([m.sum() for m in masks]).sum().reshape(1).to(torch.int64)
    dist.all_reduce(total, group=group)
    return int(total)
