"""Mixed-Growing topology update of one sparse tensor (docs/design.md §4), and the optimizer-state reset.

For a tensor with n_act active weights, a target of n_tgt and drop fraction ζ:

    Δ = n_act − n_tgt,   n_prune = max(⌊ζ·n_act⌋, Δ),   n_grow = n_prune − Δ

drop the n_prune active weights of smallest |w|; among the positions inactive after the drop, grow
n_grad = round(g·n_grow) of largest |dense gradient| (g = 0.75 is Mixed-Growing's 3:1, 1 is RigL,
0 is SET) and n_grow − n_grad uniformly at random. A weight dropped and regrown in the same update
keeps its value and optimizer state; truly dropped and truly grown weights are zeroed, state too.

Ranking is deterministic (same weights and gradient give the same mask) and the random part draws
from a CPU generator the caller owns, so every DDP rank seeded alike picks the same positions and
the mask does not depend on the device the weights live on.

Tile-structured masks (``tile=b``, docs/design.md §9) run the same update on the tile grid: a tile's
magnitude is the L2 norm of its weights, its gradient score the L2 norm of its dense gradient, the
counts are tiles, and the random share draws one number per tile; the result is expanded to the weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.tile_layout import expand, tile_norms, to_tiles
from .sharding import local


def prune_grow_counts(n_act: int, n_tgt: int, zeta: float) -> tuple[int, int]:
    """(n_prune, n_grow) for one tensor: target-tracking counts of docs/design.md §4."""
    delta = n_act - n_tgt
    n_prune = min(n_act, max(int(math.floor(zeta * n_act)), delta))
    return n_prune, n_prune - delta


def gradient_share(n_grow: int, grad_fraction: float) -> int:
    """How many of n_grow positions are chosen by gradient: round(g·n_grow), halves rounded up."""
    return int(math.floor(grad_fraction * n_grow + 0.5))


def probed(active, target, zeta: float, grad_fraction: float) -> set[str]:
    """The weights whose update (from ``active`` to ``target`` counts, drop fraction ``zeta``) grows
    some positions by gradient, so the step before it must form their dense gradient."""
    return {n for n, a in active.items() if gradient_share(prune_grow_counts(a, target[n], zeta)[1], grad_fraction)}


@dataclass
class TopologyChange:
    """The outcome of one tensor's update (all masks flat, on the weight's device)."""

    mask: Tensor  # (N,) bool, the new mask
    dropped: Tensor  # (N,) bool, active before and inactive now
    grown: Tensor  # (N,) bool, inactive before and active now
    by_gradient: Tensor  # (N,) bool, positions grown by gradient (a regrown one included)
    n_prune: int
    n_grow_gradient: int
    n_grow_random: int
    regrown: int  # dropped and regrown in the same update (kept as they were)
    gradient_fallback: bool = False  # no usable gradient: the gradient share was grown at random


def _select(scores: Tensor, k: int, largest: bool) -> Tensor:
    """Indices of the k best scores (k may be 0)."""
    if k <= 0:
        return scores.new_empty(0, dtype=torch.long)
    return torch.topk(scores, k, largest=largest, sorted=False).indices


@torch.no_grad()
def mixed_growing(
    weight: Tensor,
    mask: Tensor,
    dense_grad: Tensor | None,
    n_target: int,
    zeta: float,
    grad_fraction: float,
    generator: torch.Generator,
    tile: int | None = None,
) -> TopologyChange:
    """Compute the new mask of one tensor. Reads ``weight``/``dense_grad``, changes nothing.

    With ``tile`` the mask is tile-structured and ``n_target`` counts tiles; the counts of the
    returned change are tiles, its masks are per weight."""
    if tile is not None:
        tiles = to_tiles(mask, tile)  # (⌈R/b⌉, ⌈C/b⌉)
        grads = None if dense_grad is None else tile_norms(dense_grad, tile)
        ch = mixed_growing(tile_norms(weight, tile), tiles, grads, n_target, zeta, grad_fraction, generator)
        for f in ("mask", "dropped", "grown", "by_gradient"):  # per tile -> per weight
            setattr(ch, f, expand(getattr(ch, f).view(tiles.shape), mask.shape, tile).reshape(-1))
        return ch
    old = mask.reshape(-1)  # (N,)
    N = old.numel()
    if not 0 <= n_target <= N:
        raise ValueError(f"mixed_growing: n_target={n_target} is outside [0, {N}] for a tensor of {N} weights")
    n_act = int(old.sum())
    n_prune, n_grow = prune_grow_counts(n_act, n_target, zeta)

    # drop: the n_prune active weights of smallest magnitude (inactive ones scored +inf, never picked)
    w = weight.detach().reshape(-1).abs().float()  # (N,)
    drop_idx = _select(w.masked_fill(~old, math.inf), n_prune, largest=False)
    after_drop = old.clone()
    after_drop[drop_idx] = False

    # grow by gradient: largest |dense gradient| among positions inactive after the drop
    fallback = False
    n_grad = gradient_share(n_grow, grad_fraction)
    g = None
    if n_grad:
        if dense_grad is not None:
            g = dense_grad.detach().reshape(-1).abs().float()  # (N,)
        if g is None or not bool(torch.isfinite(g).all()):
            fallback, n_grad = True, 0  # a skipped or overflowed gradient: grow everything at random
    grown_now = torch.zeros_like(old)
    if n_grad:
        grown_now[_select(g.masked_fill(after_drop, -1.0), n_grad, largest=True)] = True
    by_gradient = grown_now.clone()

    # grow at random: a uniform subset of the positions still free
    n_rand = n_grow - n_grad
    if n_rand:
        r = torch.rand(N, generator=generator, device="cpu").to(old.device)  # (N,) in [0, 1)
        grown_now[_select(r.masked_fill(after_drop | grown_now, -1.0), n_rand, largest=True)] = True

    new = after_drop | grown_now
    return TopologyChange(
        mask=new,
        dropped=old & ~new,
        grown=new & ~old,
        by_gradient=by_gradient,
        n_prune=n_prune,
        n_grow_gradient=n_grad,
        n_grow_random=n_rand,
        regrown=int((grown_now & old).sum()),
        gradient_fallback=fallback,
    )


@torch.no_grad()
def apply_change(param: Tensor, change: TopologyChange, optimizer: torch.optim.Optimizer | None) -> None:
    """Zero dropped and grown weights and their optimizer state; keep everything else bit for bit.

    The optimizer state is reset there too (``zero_state``), which also zeroes it wherever the new
    mask is 0. Sharded (an FSDP2 DTensor ``param``): ``change`` holds this rank's slices, applied to
    the local shard and its local optimizer state.
    """
    shard = local(param)
    new = change.mask.view_as(shard)
    reset = (~change.mask | change.grown).view_as(shard)
    shard.mul_(new)
    shard.masked_fill_(change.grown.view_as(shard), 0.0)
    zero_state(optimizer, param, reset)


@torch.no_grad()
def zero_state(optimizer: torch.optim.Optimizer | None, param: Tensor, where: Tensor) -> None:
    """Zero ``param``'s optimizer state where ``where`` is True: every state tensor shaped like the
    parameter (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    ...). A moment left at a masked position would revive a dead weight on its next step.
    Sharded: ``where`` is this rank's slice, and the states' local shards are zeroed."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            local(value).masked_fill_(where, 0)
