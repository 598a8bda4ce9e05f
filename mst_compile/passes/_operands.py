"""Matmul operands for the linear pass: which operands are a 2-D parameter
seen through views (``W``, ``Wᵀ``, ``W`` broadcast over a batch), found by walking the fx graph's
use-def edges back from the operand to its ``get_attr``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ._ops import EXPAND, PERMUTE, RESHAPE, SAME, TRANSPOSE, UNSQUEEZE, VIEWS, T, key, shape_only


@dataclass
class Operand:
    """A matmul operand that is a 2-D parameter seen through views: W, Wᵀ, or W broadcast over a batch."""

    root: fx.Node  # the parameter's get_attr
    name: str
    param: nn.Parameter
    chain: list  # the view nodes between root and the operand, operand first
    transposed: bool = False  # the operand is Wᵀ
    batched: bool = False  # the operand is W.unsqueeze(0).expand(B, ...)
    why: str | None = None  # a view the pass cannot follow


def is_linear_module(mod: nn.Module) -> bool:
    """``nn.Linear`` or a subclass that keeps its forward (``NonDynamicallyQuantizableLinear``)."""
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def param_of(gm: fx.GraphModule, node) -> tuple[str, nn.Parameter] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return (node.target, p) if p.dim() == 2 else None


def _ints(args) -> list | None:
    """Flatten ``view(a, b)`` / ``view((a, b))`` style arguments; None when one is not a plain int."""
    flat = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple, torch.Size)) else list(args)
    return flat if all(isinstance(a, int) for a in flat) else None


def _step(op: Operand, node: fx.Node, shape: list[int]) -> str | None:
    """Apply one view node to the operand's state; returns why when it is not a matrix view."""
    k, rest, nd = key(node), node.args[1:], len(shape)
    if k in SAME:
        return None
    if k in T or (k is getattr and rest in (("T",), ("mT",))):
        if nd != 2 and rest != ("mT",):
            return f"{node.name} transposes a {nd}-D view"
        op.transposed ^= True
    elif k in TRANSPOSE or k in PERMUTE:
        dims = _ints(rest)
        if dims is None:
            return f"{node.name} has symbolic dims"
        dims = [d % nd for d in dims]
        if k in TRANSPOSE:
            dims = [dims[1] if i == dims[0] else dims[0] if i == dims[1] else i for i in range(nd)]
        swapped = list(range(nd - 2)) + [nd - 1, nd - 2]
        if dims == swapped:
            op.transposed ^= True
        elif dims != list(range(nd)):
            return f"{node.name} permutes the parameter's dims {dims}"
    elif k in RESHAPE:
        new = _ints(rest)
        known = -math.prod(new) if new is not None and new.count(-1) == 1 else 0
        if new is None or new.count(-1) > 1 or (known and math.prod(shape) % known):
            return f"{node.name} reshapes it to a size the pass cannot check"
        if known:
            new[new.index(-1)] = math.prod(shape) // known
        if new != shape:
            return f"{node.name} views it as {tuple(new)}"
    elif k in UNSQUEEZE and nd == 2 and rest in ((0,), (-3,)):
        op.batched = True
    elif k in EXPAND and nd == 3:
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if len(sizes) != 3 or any(s not in (-1, d) for s, d in zip(sizes[1:], shape[1:])):
            return f"{node.name} expands the matrix dims"
    else:
        return f"{node.name} ({k}) is not a view the pass follows"
    return None


def operand(gm: fx.GraphModule, node) -> Operand | None:
    """Follow views from ``node`` back to a 2-D parameter; None when ``node`` is not such a view."""
    chain = []
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args and (
            key(node) in VIEWS or key(node) is getattr) and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    hit = param_of(gm, node)
    if hit is None:
        return None
    op = Operand(node, hit[0], hit[1], chain)
    for view in reversed(chain):  # root to operand
        shape = list(op.param.shape[::-1] if op.transposed else op.param.shape)
        if op.batched:
            shape = [1, *shape]
        op.why = _step(op, view, shape)
        if op.why:
            op.why = f"the operand is a view of it the pass cannot follow: {op.why}"
            break
    return op


def lineage(gm: fx.GraphModule) -> dict[fx.Node, frozenset | None]:
    """Per node: the 2-D parameters its value is computed from, or None when it depends on the inputs.

    Shape queries (``x.size()``, ``sym_size``) carry no values, so ``W.expand(x.size(0), ...)`` is
    still computed from W alone."""
    out: dict[fx.Node, frozenset | None] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out[n] = None
        elif n.op == "get_attr":
            hit = param_of(gm, n)
            out[n] = frozenset([hit[0]]) if hit else frozenset()
        elif shape_only(n):
            out[n] = frozenset()
        else:
            acc: frozenset | None = frozenset()
            for a in n.all_input_nodes:
                if out.get(a, frozenset()) is None:
                    acc = None
                    break
                acc |= out.get(a, frozenset())
            out[n] = acc
    return out


def einsum_operands(node: fx.Node) -> tuple[object, list]:
    """(equation, operands) of an einsum node, for ``einsum(eq, a, b)`` and ``einsum(eq, [a, b])``."""
    args = node.args
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    return args[0] if args else None, ops


def einsum_plan(w: str, x: str, out: str):
    """(W stored (in, out)?, x permute, y permute) when ``x,w->out`` is a linear layer on x, else None."""
    xs, ys = x.replace("...", "."), out.replace("...", ".")  # "." stands for the ellipsis
    if len(w) != 2 or len(set(w)) != 2 or "." in w or len(set(xs)) != len(xs) or len(set(ys)) != len(ys):
        return None
    c = [ch for ch in w if ch in xs and ch not in ys]  # the contracted (input-feature) index
    o = [ch for ch in w if ch not in xs and ch in ys]  # the output-feature index
    if len(c) != 1 or len(o) != 1 or set(xs) - set(c) != set(ys) - set(o):
        return None
    keep = ys.replace(o[0], "")

    def permute(src: str, dst: str) -> str | None:
        return None if src == dst else f"{src}->{dst}".replace(".", "...")

    return w[0] == c[0], permute(xs, keep + c[0]), permute(keep + o[0], ys)
