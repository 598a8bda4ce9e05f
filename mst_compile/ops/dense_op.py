"""A matmul or attention op that stayed dense, wrapped so the FLOP ledger can charge it (docs/design.md §6).

``DenseOp`` runs the original op unchanged. The ledger charges its forward FLOPs ×3 (forward plus a
backward of twice the work) on both the MST and the dense side, so a site the passes did not rewrite
can never inflate the reduction. Forward FLOPs, from the real operands:

- matmul / mm / bmm / linear / addmm / baddbmm: 2 · (output elements) · (contracted size)
- einsum: 2 · (output elements) · (product of the contracted index sizes)
- scaled_dot_product_attention: 2 · B·H · T_q · a · (d_qk + d_v), with a = T_k, or (T + 1)/2 keys per
  query when ``is_causal`` (the ledger's causal convention)
"""
from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

KINDS = ("matmul", "linear", "addmm", "einsum", "sdpa")


class DenseOp(nn.Module):
    """One dense op site: ``kind`` in ``KINDS``, ``fn`` the op it calls."""

    def __init__(self, name: str, kind: str, fn: Callable):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"DenseOp {name!r}: kind {kind!r} is not one of {KINDS}")
        self.name, self.kind, self.fn = name, kind, fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def forward_flops(self, args: tuple, kwargs: dict, out: Tensor) -> float:
        """FLOPs of this call's forward."""
        if self.kind == "einsum":
            eq, ops = (args[0], list(args[1])) if len(args) == 2 and isinstance(args[1], (list, tuple)) else (args[0], list(args[1:]))
            return 2.0 * out.numel() * _contracted(eq, ops)
        if self.kind == "sdpa":
            q, k, v = args[:3]
            T, D = q.shape[-2], q.shape[-1]
            keys = (T + 1) / 2 if kwargs.get("is_causal", args[5] if len(args) > 5 else False) and k.shape[-2] == T else k.shape[-2]
            return 2.0 * (q.numel() // D) * keys * (D + v.shape[-1])
        a = args[1] if self.kind in ("addmm",) else args[0]  # addmm/baddbmm(input, a, b); the others (a, b)
        return 2.0 * out.numel() * a.shape[-1]


def _contracted(eq: str, ops: list[Tensor]) -> int:
    """Product of the sizes of the indices summed over (in an operand, not in the output)."""
    lhs, _, out = eq.replace(" ", "").partition("->")
    sizes = {}
    for term, t in zip(lhs.split(","), ops):
        letters = term.replace("...", "")
        lead = t.dim() - len(letters)  # dims taken by the ellipsis
        for i, ch in enumerate(letters):
            sizes[ch] = t.shape[lead + i] if "..." in term and term.index("...") <= term.find(ch) else t.shape[i]
    if "->" not in eq:  # implicit output: the indices that appear once
        out = "".join(ch for ch in sizes if lhs.count(ch) == 1)
    return math.prod(s for ch, s in sizes.items() if ch not in out)
