"""The compute-fair baselines of reproduce.py, sized by the ledger's closed form for examples/tiny_gpt.py.

Per token, a tied byte-level GPT with L blocks of width d, vocabulary V and sequence length T costs
(docs/design.md §6, forward + backward):

    linear     6 · (12·L·d² + V·d)          c_attn 3d², c_proj d², MLP 8d² per block, the tied head V·d
    attention  12 · d · L · (T + 1)/2       dense causal: (T + 1)/2 keys per query on average

``reproduce.py`` checks this against the ledger of its dense run before trusting it. From it:

- static sparsity at MST's FLOPs: only the linear part shrinks, by the density (1 − s);
- the dense frontier: smaller dense models trained for all the steps whose FLOPs match MST's, found
  by searching widths at the same depth and at half the depth. A width must be a multiple of the
  head count; when no multiple of the main model's head count lands within ``TOLERANCE`` of the
  budget, fewer heads are allowed (the most heads that do).
"""
from __future__ import annotations

VOCAB = 256
TOLERANCE = 0.05  # the bar: a sized baseline's FLOPs within 5% of MST's


def linear_per_token(L: int, d: int, V: int = VOCAB) -> float:
    return 6.0 * (12 * L * d * d + V * d)


def attention_per_token(L: int, d: int, T: int) -> float:
    return 12.0 * d * L * (T + 1) / 2


def dense_per_token(L: int, d: int, T: int, V: int = VOCAB) -> float:
    return linear_per_token(L, d, V) + attention_per_token(L, d, T)


def static_sparsity_for(budget_per_token: float, L: int, d: int, T: int) -> float:
    """The sparsity s whose static run (dense attention, no probes) costs ``budget_per_token``."""
    density = (budget_per_token - attention_per_token(L, d, T)) / linear_per_token(L, d)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"no static sparsity costs {budget_per_token:.4g} FLOPs/token for L={L}, d={d}")
    return 1.0 - density


def params(L: int, d: int, T: int, V: int = VOCAB) -> int:
    """Parameters of the tied GPT: embeddings V·d + T·d, per block 12d² + 13d (two norms, four linears with
    biases), the final norm 2d."""
    return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


def nearest_width(size, target: float, n_head: int) -> tuple[int, int]:
    """(width, heads): the width whose ``size(width)`` is nearest ``target``, with the most heads
    (≤ n_head, the width a multiple of them) that land within TOLERANCE (else the nearest over all)."""
    best = []
    for heads in range(n_head, 0, -1):
        d = min(range(heads, 4096, heads), key=lambda w: abs(size(w) - target))
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
