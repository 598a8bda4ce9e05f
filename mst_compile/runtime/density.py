"""Layer-wise density allocation (docs/design.md §2): how many weights each sparse tensor keeps.

``allocate`` returns exact active counts per tensor whose sum is ``round((1 - s) · Σ N_l)``, so the
realised global density matches the target to one weight, whatever the rounding of each layer.
With ``tile=b`` the counts are of b×b tiles (N_l = ⌈rows/b⌉·⌈cols/b⌉, edge tiles counted whole) and
the budget is exact in tiles; the ER scores still come from the weights' shapes (docs/design.md §9).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..ops.tile_layout import n_tiles


def _raw_scores(shapes: Mapping[str, Sequence[int]], distribution: str) -> dict[str, float]:
    """Relative density of each tensor before scaling by ε (uniform: 1; ER: (n_in + n_out) / (n_in·n_out))."""
    if distribution == "uniform":
        return {n: 1.0 for n in shapes}
    return {n: sum(shape[:2]) / math.prod(shape[:2]) for n, shape in shapes.items()}


def allocate(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "er",
             tile: int | None | Mapping[str, int | None] = None) -> dict[str, int]:
    """Active weight count (``tile=b``: active tile count) per tensor for a global ``sparsity`` under ``distribution``.

    ER: density_l = ε·(n_in + n_out)/(n_in·n_out) with ε chosen so Σ density_l·N_l equals the
    target; a tensor whose density would exceed 1 is made dense and ε is solved again over the rest.
    ``tile`` may also map each tensor to its own edge (None: that tensor counts weights): ε is then
    solved in weights (a tile of edge b weighs b² of them) and each group of the same edge is rounded
    to its own exact total, so the realised density is exact within one tile. ``distribution`` and
    ``sparsity`` are as ``MSTConfig`` and ``set_sparsity`` checked them.
    """
    edge = dict(tile) if isinstance(tile, Mapping) else dict.fromkeys(shapes, tile)
    numel = {n: math.prod(s) if edge[n] is None else n_tiles(s, edge[n]) for n, s in shapes.items()}
    # weights per counted unit; b² is a power of two, so one edge for every tensor stays exact in tiles
    area = {n: 1 if edge[n] is None else edge[n] ** 2 for n in shapes}
    total = sum(numel[n] * area[n] for n in shapes)
    target = (1.0 - sparsity) * total
    raw = _raw_scores(shapes, distribution)

    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        budget = target - sum(numel[n] * area[n] for n in dense)
        denom = sum(raw[n] * numel[n] * area[n] for n in rest)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    exact = {n: float(numel[n]) if n in dense else eps * raw[n] * numel[n] for n in shapes}
    counts: dict[str, int] = {}
    for b in set(edge.values()):  # each unit rounded to its own total
        group = [n for n in shapes if edge[n] == b]
        counts.update(_round_to_total({n: exact[n] for n in group}, {n: numel[n] for n in group},
                                      round(sum(exact[n] for n in group))))
    return {n: counts[n] for n in shapes}


def _round_to_total(exact: dict[str, float], cap: dict[str, int], target: int) -> dict[str, int]:
    """Floor every count, then hand out the remainder by largest fractional part (never above cap)."""
    counts = {n: min(cap[n], math.floor(v)) for n, v in exact.items()}
    short = target - sum(counts.values())
    order = sorted(exact, key=lambda n: (-(exact[n] - math.floor(exact[n])), n))
    while short > 0:
        progressed = False
        for n in order:
            if short == 0:
                break
            if counts[n] < cap[n]:
                counts[n] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    return counts

