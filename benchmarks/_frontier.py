"""The compute-fair baselines of reproduce.py: sizes of examples/tiny_gpt.py's GPT whose training FLOPs
or parameter count match MST's.

Every count is the library's own. Training FLOPs per token are the FLOP ledger's (docs/design.md §6):
``sm.mst.footprint`` of one forward of the model at that size, charged by ``Footprint.step_flops`` at
density 1 with dense causal attention, which is how the trainer charges a dense run
(``mst_compile.train.accounting``). The count does not depend on the head count (attention is charged
12·d_head·n_heads = 12·d per attended key), so the model is built with one head. Parameter counts
are the model's. From them:

- static sparsity at MST's FLOPs: only the sparse linears' part shrinks, by the density (1 − s);
- the dense frontier: smaller dense models trained for all the steps whose FLOPs match MST's, found
  by searching widths at the same depth and at half the depth. A width must be a multiple of the
  head count; when no multiple of the main model's head count lands within ``TOLERANCE`` of the
  budget, fewer heads are allowed (the most heads that do).
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

GPT_FILE = Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt.py"
TOLERANCE = 0.05  # the bar: a sized baseline's FLOPs within 5% of MST's
WIDEST = 4096  # widths searched: the multiples of the head count below this


@cache
def gpt_class():
    from mst_compile.modelfile import load_model_file

    return load_model_file(GPT_FILE).namespace.GPT


@cache
def per_token(L: int, d: int, T: int) -> tuple[float, float]:
    """(sparse linears, the rest) of the dense model's training FLOPs per token, by the ledger: the GPT of
    L blocks of width d over T tokens, at density 1 with dense causal attention."""
    import torch

    import mst_compile

    x = torch.zeros(1, T, dtype=torch.long)
    sm = mst_compile.sparsify(gpt_class()(block_size=T, n_layer=L, n_head=1, n_embd=d), example_inputs=(x,))
    fp = sm.mst.footprint(x)
    dense_attention = {(site, t): ("dense", t) for site, _, t, _ in fp.attention}
    _, dense, linear, _ = fp.step_flops(dict.fromkeys(fp.linear, 1.0), (), dense_attention)
    return linear / fp.tokens, (dense - linear) / fp.tokens


def dense_per_token(L: int, d: int, T: int) -> float:
    return sum(per_token(L, d, T))


def static_sparsity_for(budget_per_token: float, L: int, d: int, T: int) -> float:
    """The sparsity s whose static run (dense attention, no probes) costs ``budget_per_token``."""
    linear, rest = per_token(L, d, T)
    density = (budget_per_token - rest) / linear
    if not 0.0 < density <= 1.0:
        raise ValueError(f"no static sparsity costs {budget_per_token:.4g} FLOPs/token for L={L}, d={d}")
    return 1.0 - density


@cache
def params(L: int, d: int, T: int) -> int:
    """Parameters of the GPT of L blocks of width d over T positions (the tied head counted once)."""
    from mst_compile.modelfile import parameter_count

    return parameter_count(gpt_class()(block_size=T, n_layer=L, n_head=1, n_embd=d))


def _nearest_multiple(size, target: float, step: int) -> int:
    """The multiple of ``step`` below WIDEST whose ``size`` (growing with the width) is nearest ``target``,
    the narrower on a tie. Doubling, then bisection: no width much above the answer is ever built."""
    last = (WIDEST - 1) // step
    below, above = 0, 1  # multiples k: size(below·step) <= target (0: none yet) < size(above·step)
    while above <= last and size(above * step) <= target:
        below, above = above, 2 * above
    above = min(above, last + 1)
    while above - below > 1:
        mid = (below + above) // 2
        below, above = (mid, above) if size(mid * step) <= target else (below, mid)
    if below == 0 or (above <= last and abs(size(above * step) - target) < abs(size(below * step) - target)):
        return min(above, last) * step
    return below * step


def nearest_width(size, target: float, n_head: int) -> tuple[int, int]:
    """(width, heads): the width whose ``size(width)`` is nearest ``target``, with the most heads
    (≤ n_head, the width a multiple of them) that land within TOLERANCE (else the nearest over all)."""
    best = []
    for heads in range(n_head, 0, -1):
        d = _nearest_multiple(size, target, heads)
        best.append((abs(size(d) / target - 1), d, heads))
    within = [b for b in best if b[0] <= TOLERANCE]
    _, d, heads = within[0] if within else min(best)
    return d, heads


def width_for_params(target: float, L: int, n_head: int, T: int) -> tuple[int, int]:
    """The depth-L model whose parameter count is nearest ``target`` (``nearest_width``)."""
    return nearest_width(lambda w: params(L, w, T), target, n_head)


def frontier(budget_per_token: float, L: int, n_head: int, T: int) -> list[tuple[str, int, int, int]]:
    """[(method, n_layer, width, heads)]: the narrower dense model at depth L and one at depth L/2,
    each the width whose dense cost is nearest the budget (``nearest_width``)."""
    out = []
    for method, depth in (("dense_narrow", L), ("dense_shallow", max(1, L // 2))):
        d, heads = nearest_width(lambda w, depth=depth: dense_per_token(depth, w, T), budget_per_token, n_head)
        out.append((method, depth, d, heads))
    return out
