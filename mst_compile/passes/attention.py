"""Attention pass: every causal attention site becomes ONE switchable HSA module call.

Sites matched (torch level from ``torch.fx.symbolic_trace``, ATen level from ``torch.export``):

    scaled_dot_product_attention(q, k, v, attn_mask?, dropout_p, is_causal, scale?, enable_gqa?)
    softmax(S) [-> casts / dropout] @ v   where S = (q @ kᵀ) with any of: * c, / c,
                                          masked_fill(m, -inf), + additive_mask, where(m, ., -inf)

Each becomes ``call_module mst_attn.attn_<i>(q, k, v, attn_mask=?, scale=?, enable_gqa=?)`` with a
``HybridSparseAttention`` (pattern ``dense`` unless asked otherwise); the replaced score, mask and
softmax nodes are erased once nothing else uses them.

Is a site causal? ``is_causal=True`` says so. An explicit mask (an SDPA ``attn_mask`` or the mask of
the hand-written spelling) is evaluated: the graph runs once on ``example_inputs`` (for exported
graphs, on inputs built from the placeholders' recorded shapes when none are given), computing only
the mask's ancestors, and the mask's allowed set is compared with ``tril(ones(T, T))``:

- a mask that depends on the inputs' shapes only (not their values; found by walking its ancestors
  and ignoring shape-only uses such as ``size``, ``sym_size``, ``new_ones``, ``*_like``) must equal the
  causal mask exactly; it is dropped and the site runs as ``is_causal``;
- a mask that depends on input values (a padding ``attention_mask``) must allow nothing that
  causality forbids; it is kept and passed to the module at run time;
- anything else (no mask, a bidirectional or padding-only mask, an additive bias that is not 0/-inf,
  query and key lengths that differ) is non-causal: left as it is and reported in ``skipped``.

The evaluation is at the example's sequence length; a mask that is causal there but not at other
lengths (a sliding window wider than the example) would be mistaken for causal.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..constants import ATTENTION_CONTAINER, SHAPES_META, blocks
from ..ops.attention import HybridSparseAttention
from . import PassResult
from ._mask_eval import allowed_set, evaluate_masks
from ._ops import ADD, ASSERTS, CAST, DIV, DROPOUT, FILL, MATMUL, MUL, PERMUTE, SDPA, SOFTMAX, TRANSPOSE, WHERE, is_op, shape_only

CONTAINER = ATTENTION_CONTAINER


@dataclass
class AttentionSite:
    """One rewritten attention site: its name (the attention module's path) and its HSA module."""

    name: str
    module: HybridSparseAttention
    kind: str = "attention"
    spelling: str = "sdpa"  # "sdpa" or "softmax" (hand-written)


@dataclass
class _Match:
    out: fx.Node  # the node whose value the HSA call replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    spelling: str
    causal: bool = False  # is_causal=True
    mask: fx.Node | None = None
    mask_kind: str = "sdpa"  # sdpa/add: bool True = allowed or additive 0/-inf; fill: True = blocked; where: True = allowed
    scale: list = field(default_factory=list)  # [(op, factor)], op in {"mul", "div"}; [] = SDPA default
    default_scale: bool = True
    gqa: bool = False
    dropout_p: float = 0.0
    why_not: str | None = None  # a reason to skip found while matching


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _ndim(node) -> int | None:
    val = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _key_of_transpose(node) -> fx.Node | None:
    """``k`` when ``node`` is kᵀ (last two dims swapped), else None."""
    if not isinstance(node, fx.Node):
        return None
    if is_op(node, TRANSPOSE):
        a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        nd = _ndim(node.args[0])
        dims = {d % nd for d in (a, b)} if nd else {a, b}
        if dims in ({-2, -1}, {2, 3}) or (nd and dims == {nd - 2, nd - 1}):
            return node.args[0]
    if is_op(node, PERMUTE):
        perm = list(node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:])
        if perm == [0, 1, 3, 2] or perm == [0, 2, 1]:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _is_neg_inf(x) -> bool:
    return isinstance(x, (int, float)) and blocks(x)


def _match_sdpa(node: fx.Node) -> _Match:
    m = _Match(out=node, q=_arg(node, 0, "query"), k=_arg(node, 1, "key"), v=_arg(node, 2, "value"), spelling="sdpa")
    m.mask = _arg(node, 3, "attn_mask")
    m.causal = bool(_arg(node, 5, "is_causal", False))
    m.gqa = bool(_arg(node, 7, "enable_gqa", False))
    p = _arg(node, 4, "dropout_p", 0.0)
    m.dropout_p = float(p) if isinstance(p, (int, float)) else 0.0
    scale = _arg(node, 6, "scale")
    if scale is not None:
        m.scale, m.default_scale = [("mul", scale)], False
    return m


def _single_user(node: fx.Node) -> fx.Node | None:
    """The one user that reads the node's values (shape queries and metadata asserts aside)."""
    users = [u for u in node.users if not shape_only(u)]
    return users[0] if len(users) == 1 else None


def _match_softmax(gm: fx.GraphModule, sm: fx.Node) -> _Match | None:
    """softmax(scores) -> [casts/dropout] -> @ v, with scores traced back to q @ kᵀ."""
    dim = _arg(sm, 1, "dim")
    if dim not in (-1, 3) and not (_ndim(sm) and dim == _ndim(sm) - 1):
        return None
    node, dropout = sm, 0.0
    while True:  # walk down to P @ v
        nxt = _single_user(node)
        if nxt is None:
            return None
        if is_op(nxt, CAST):
            node = nxt
        elif is_op(nxt, DROPOUT):
            p, train = _arg(nxt, 1, "p", 0.5), _arg(nxt, 2, "training" if nxt.op == "call_function" else "train", True)
            dropout = float(p) if train and isinstance(p, (int, float)) else dropout
            node = nxt
        elif nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), nn.Dropout):
            dropout, node = gm.get_submodule(nxt.target).p, nxt
        elif is_op(nxt, MATMUL) and nxt.args[0] is node:
            out, v = nxt, nxt.args[1]
            break
        else:
            return None
    m = _Match(out=out, q=None, k=None, v=v, spelling="softmax", dropout_p=dropout, default_scale=False)
    node = sm.args[0]
    while True:  # walk up to q @ kᵀ
        if _single_user(node) is None:
            m.why_not = "the attention scores are used elsewhere"
        if is_op(node, MATMUL):
            k = _key_of_transpose(node.args[1])
            if k is None:
                return None
            m.q, m.k = node.args[0], k
            return m
        if is_op(node, CAST):
            node = node.args[0]
        elif is_op(node, MUL | DIV):
            a, b = node.args[0], node.args[1]
            x, c = (a, b) if _is_scores(a) else (b, a)
            if not _is_scores(x) or (is_op(node, DIV) and x is not a):
                return None
            m.scale.append(("mul" if is_op(node, MUL) else "div", c))
            node = x
        elif is_op(node, FILL) and m.mask is None:
            if not _is_neg_inf(_arg(node, 2, "value")):
                return None
            m.mask, m.mask_kind, node = node.args[1], "fill", node.args[0]
        elif is_op(node, ADD) and m.mask is None:
            a, b = node.args[0], node.args[1]
            x, mask = (a, b) if _is_scores(a) else (b, a)
            if not _is_scores(x) or not isinstance(mask, fx.Node):
                return None
            m.mask, m.mask_kind, node = mask, "add", x
        elif is_op(node, WHERE) and m.mask is None and _is_neg_inf(node.args[2]):
            m.mask, m.mask_kind, node = node.args[0], "where", node.args[1]
        else:
            return None


def _is_scores(node, depth: int = 0) -> bool:
    """True when ``node`` leads back to a q @ kᵀ through score ops (tells scores from mask/scale)."""
    if not isinstance(node, fx.Node) or depth > 16:
        return False
    if is_op(node, MATMUL):
        return _key_of_transpose(node.args[1]) is not None
    if is_op(node, MUL | ADD):
        return any(_is_scores(a, depth + 1) for a in node.args[:2])
    if is_op(node, CAST | DIV | FILL):
        return _is_scores(node.args[0], depth + 1)
    return is_op(node, WHERE) and _is_scores(node.args[1], depth + 1)


def depends_on_data(mask: fx.Node) -> bool:
    """True when the mask reads the VALUES of a graph input (not only its shape). An input that a per-block
    capture marked as computed from shapes alone (``SHAPES_META``: the causal mask a model builds once for
    all its blocks) is not data."""
    seen, todo = set(), [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.meta.get(SHAPES_META):
                continue
            return True
        if shape_only(n):
            continue
        todo.extend(n.all_input_nodes)
    return False


def _verdict(m: _Match, value, data_dependent: bool) -> tuple[bool, str | None]:
    """(keep_mask, reason_to_skip)."""
    if m.why_not:
        return False, m.why_not
    if m.mask is None:
        if m.causal:
            return False, None
        return False, "non-causal attention (no causal mask: encoder / bidirectional)"
    if isinstance(value, Exception):
        first = (str(value).strip().splitlines() or [""])[0]
        return False, f"could not evaluate the attention mask ({type(value).__name__}: {first}); pass example_inputs"
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False, "the attention mask is not a tensor of shape (..., T, T)"
    allowed = allowed_set(value, m.mask_kind)
    if isinstance(allowed, str):
        return False, allowed
    Tq, Tk = allowed.shape[-2:]
    if Tq != Tk:
        return False, f"query and key lengths differ ({Tq} vs {Tk}): not causal self-attention"
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=allowed.device).tril()
    if not bool((allowed <= causal).all()):
        return False, "non-causal attention (the mask allows future keys: encoder / bidirectional)"
    if data_dependent:
        return True, None
    if not bool((allowed == causal).all()):
        return False, "the attention mask removes causal keys too (a window or block mask), not plain causal"
    return False, None


def _layout(val) -> tuple[int, ...] | None:
    """The dims of the captured attention output in memory order, outermost first (torch.export records
    its strides); None where the graph does not say (torch.fx)."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        strides = [int(getattr(s, "node", None).hint if isinstance(s, torch.SymInt) else s) for s in val.stride()]
    except (TypeError, AttributeError):  # a symbolic stride without a hint
        return None
    return tuple(sorted(range(len(strides)), key=lambda d: -strides[d]))


def _site_name(node: fx.Node, used: set[str]) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    path = path if isinstance(path, str) and path else f"attention_{len(used)}"
    name, i = path, 1
    while name in used:
        name, i = f"{path}.{i}", i + 1
    used.add(name)
    return name




def _erase_dead(graph: fx.Graph, seeds) -> None:
    """Erase the nodes the rewrite left unused (and their unused inputs), nothing else.

    Random ops (SDPA and dropout are tagged nondeterministic) count as removable here, and a node used
    only by metadata asserts goes together with them.
    """
    todo, erased = list(seeds), set()
    while todo:
        n = todo.pop()
        if n in erased or n.op in ("placeholder", "output") or any(not is_op(u, ASSERTS) for u in n.users):
            continue
        if n.op != "get_attr" and n.is_impure(impure_random=False):
            continue
        for u in list(n.users):
            graph.erase_node(u)
            erased.add(u)
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        todo.extend(inputs)


def _scale_arg(graph: fx.Graph, m: _Match):
    """The softmax spelling's scale as one constant or one graph value (1.0 when none is applied)."""
    const, nodes = 1.0, []
    for op, c in m.scale:
        if isinstance(c, fx.Node):
            nodes.append((op, c))
        elif isinstance(c, (int, float)):
            const = const * c if op == "mul" else const / c
        else:
            return None
    if m.default_scale and not m.scale:
        return None
    out = const
    for op, c in nodes:
        out = graph.call_function(operator.mul if op == "mul" else operator.truediv, (out, c))
    return out


def rewrite_attention(
    gm: fx.GraphModule, *, pattern: str = "dense", stride: int | None = None, example_inputs=None
) -> PassResult:
    """Replace every causal attention site of ``gm`` by a ``HybridSparseAttention`` call (in place); each
    site checks ``pattern`` and ``stride`` as it is built."""
    graph = gm.graph
    matches = []
    for node in list(graph.nodes):
        try:
            m = _match_sdpa(node) if is_op(node, SDPA) else _match_softmax(gm, node) if is_op(node, SOFTMAX) else None
        except Exception as e:  # an odd graph must not stop sparsify: report the site instead
            m = _Match(out=node, q=None, k=None, v=None, spelling="?", why_not=f"could not analyse ({type(e).__name__}: {e})")
        if m is not None:
            matches.append(m)
    masks = list({m.mask: None for m in matches if isinstance(m.mask, fx.Node) and not m.why_not})
    try:
        values = evaluate_masks(gm, masks, example_inputs)
    except Exception as e:  # reported per site below
        values = {n: e for n in masks}
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.Module())
    container = gm.get_submodule(CONTAINER)
    result = PassResult(gm=gm, name="attention")
    used = {getattr(mod, "site", "") for mod in container.children()}
    for m in matches:
        name = _site_name(m.out, used)
        if m.mask is not None and not isinstance(m.mask, fx.Node):
            keep, why = False, "the attention mask is not a graph value"
        else:
            keep, why = _verdict(m, values.get(m.mask), m.mask is not None and depends_on_data(m.mask))
        if why:
            result.skipped.append((name, why))
            continue
        module = HybridSparseAttention(name, pattern, stride, dropout_p=m.dropout_p)
        module.layout = _layout(m.out.meta.get("val"))
        slot = f"attn_{len(list(container.children()))}"
        container.add_module(slot, module)
        with graph.inserting_before(m.out):
            kwargs = {"attn_mask": m.mask if keep else None, "scale": _scale_arg(graph, m)}
            if m.gqa:
                kwargs["enable_gqa"] = True
            if m.mask_kind == "fill" and keep:  # the module takes True = allowed
                kwargs["attn_mask"] = graph.call_function(torch.logical_not, (m.mask,))
            new = graph.call_module(f"{CONTAINER}.{slot}", (m.q, m.k, m.v), kwargs)
        new.meta.update(m.out.meta)
        m.out.replace_all_uses_with(new)
        _erase_dead(graph, [m.out])
        result.sites.append(AttentionSite(name, module, spelling=m.spelling))
    graph.lint()
    gm.recompile()
    return result
