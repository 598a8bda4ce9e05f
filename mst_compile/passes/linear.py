"""Linear pass: every 2-D parameter consumed by a matmul becomes one mask-carrying sparse op (docs/design.md §2).

A site is a matmul-like node one of whose operands is a 2-D ``nn.Parameter`` (a ``get_attr``), seen
through any chain of views that keep it a matrix (``.t()``, ``.T``, ``transpose``, ``permute``,
``contiguous``, casts, same-shape ``view``/``reshape``, and ``unsqueeze(0).expand(B, ...)`` for
``bmm``). Every site is put in the form ``y = x @ Wᵀ`` with W as stored (or ``x @ W`` when W is
stored (in, out), ``transposed=True``):

    nn.Linear(x), F.linear / aten.linear(x, W or Wᵀ, b)
    x @ W, x @ Wᵀ, torch.matmul, mm, bmm(x, W broadcast), addmm(b, x, W)  (HF Conv1D)
    W @ x                                  -> swap(sparse(swap(x), W))   (swap: the last two dims)
    einsum("btd,vd->btv", x, W), any one-parameter einsum that contracts W like a linear layer
                                           -> einsum permutes of x and y around sparse(x, W) when needed

Produced: ``call_module mst_sites.<weight>(x, get_attr W, bias, transposed=...)`` where
``mst_sites.<weight>`` is the ``SparseWeight`` of that parameter. A parameter used at several sites
or spellings (a tied ``lm_head`` written ``h @ wte.weight.T``) gets one ``SparseWeight``, so all uses
share one mask; a parameter that also has non-matmul uses (the token embedding of a tied head) is
reported in ``PassResult.other_uses`` so the runtime masks its gradient there too.
``_match`` turns each node into one ``_Match``: a ``_Site`` to emit, or the reason to leave it dense.

A matmul whose operand is a parameter the pass cannot put in that form (another view, a weight
computed from parameters, two parameter operands, a weight hidden inside a module that ``torch.fx``
keeps as one call such as ``nn.MultiheadAttention``) is listed in ``PassResult.skipped`` with why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..constants import SPARSE_CONTAINER, UNCOUNTED
from ..ops.sparse_linear import SparseWeight, swap_last
from . import PassResult
from ._operands import Operand, einsum_operands, einsum_plan, is_linear_module, lineage, operand, param_of
from ._ops import ADDMM, BMM, EINSUM, LINEAR, MATMUL, key

CONTAINER = SPARSE_CONTAINER


@dataclass
class LinearSite:
    """One rewritten parameter: its name, shape and the graph nodes that use it."""

    name: str  # the parameter's fully qualified name
    shape: tuple[int, ...]
    module: SparseWeight
    uses: int = 0
    kind: str = "linear"


@dataclass
class _Site:
    """How to rewrite one matmul as ``sparse(x, W)``."""

    x: object  # the other operand
    w: Operand | None  # None: an nn.Linear called as a module (``module``), its weight and bias read from it
    bias: object = None
    transposed: bool = False  # W is stored (in, out): y = x @ W
    left: bool = False  # y = W @ x
    pre: str | None = None  # einsum equation permuting x before the sparse op
    post: str | None = None  # einsum equation permuting its output
    module: str | None = None  # the nn.Linear module called


@dataclass
class _Match:
    """A matmul of a parameter: how to rewrite it, or why the pass leaves it dense."""

    param: str  # the parameter's name (two names, comma-separated, when both operands are parameters)
    site: _Site | None = None
    why: str | None = None  # set when the pass cannot rewrite it


def _safe(name: str) -> str:
    return name.replace(".", "__")


def _computed_weight(gm: fx.GraphModule, node: fx.Node, derived) -> _Match | None:
    """A matmul the pass left whose operand is computed from parameters (``x @ (2 * W)``)."""
    if key(node) not in LINEAR | ADDMM | MATMUL | BMM | EINSUM:
        return None
    names = sorted(set().union(*[derived.get(a) or () for a in node.all_input_nodes]))
    if not names:
        return None
    return _Match(", ".join(names), why="the operand is computed from the parameter, not a view of it")


def _is_vector(gm: fx.GraphModule, node) -> bool:
    """True when a node is known to be 1-D (a bias that F.linear semantics accept)."""
    if node is None:
        return True
    if node.op == "get_attr":
        try:
            return gm.get_parameter(node.target).dim() == 1
        except AttributeError:
            return False
    val = node.meta.get("val", node.meta.get("example_value"))
    return isinstance(val, torch.Tensor) and val.dim() == 1


def _match(gm: fx.GraphModule, node: fx.Node) -> _Match | None:
    """The ``_Match`` of a node that multiplies by a 2-D parameter, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if is_linear_module(mod) and len(node.args) == 1 and not node.kwargs:
            return _Match(f"{node.target}.weight", _Site(node.args[0], None, module=node.target))
        return None
    k, args, kw = key(node), node.args, node.kwargs
    if k in LINEAR:
        x, w = args[0], args[1] if len(args) > 1 else kw.get("weight")
        b = args[2] if len(args) > 2 else kw.get("bias")
        ops, bias_ok = [(operand(gm, x), x), (operand(gm, w), w)], _is_vector(gm, b)
    elif k in ADDMM and len(args) == 3:
        b, x, w = args
        ops, bias_ok = [(operand(gm, x), x), (operand(gm, w), w)], _is_vector(gm, b)
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return _skip(ops, "addmm with alpha/beta other than 1")
    elif (k in MATMUL or k in BMM) and len(args) == 2 and not kw:
        ops, b, bias_ok = [(operand(gm, a), a) for a in args], None, True
    elif k in EINSUM:
        return _match_einsum(gm, node)
    else:
        return None
    (xo, x), (wo, w) = ops
    if xo is not None and wo is not None:
        return _skip(ops, "both operands are parameters")
    left = wo is None and xo is not None and k not in LINEAR and k not in ADDMM
    if left:  # y = W @ x
        (wo, w), (xo, x) = ops
    if wo is None:
        return None
    if wo.why or not bias_ok or (wo.batched and k not in BMM):
        return _Match(wo.name, why=wo.why or ("its bias is not known to be 1-D" if not bias_ok else "a broadcast parameter outside bmm"))
    if k in LINEAR:  # F.linear(x, Wop) = x @ Wopᵀ
        return _Match(wo.name, _Site(x, wo, b, transposed=wo.transposed))
    if left:  # W @ x = swap(swap(x) @ Wᵀ)
        return _Match(wo.name, _Site(x, wo, None, transposed=wo.transposed, left=True))
    return _Match(wo.name, _Site(x, wo, b, transposed=not wo.transposed))  # x @ Wop


def _match_einsum(gm: fx.GraphModule, node: fx.Node) -> _Match | None:
    eq, operands = einsum_operands(node)
    ops = [(operand(gm, o), o) for o in operands]
    params = [i for i, (o, _) in enumerate(ops) if o is not None]
    if not params:
        return None
    if not isinstance(eq, str) or len(ops) != 2 or len(params) != 1 or "->" not in eq:
        why = "both operands are parameters" if len(params) > 1 else "an einsum the pass cannot read (two operands and '->' needed)"
        return _skip(ops, why)
    i = params[0]
    w = ops[i][0]
    lhs, _, out = eq.replace(" ", "").partition("->")
    terms = lhs.split(",")
    plan = einsum_plan(terms[i], terms[1 - i], out) if len(terms) == 2 else None
    if w.why or w.batched or plan is None:
        return _Match(w.name, why=w.why or f"einsum {eq!r} does not contract the parameter like a linear layer")
    in_out, pre, post = plan
    return _Match(w.name, _Site(ops[1 - i][1], w, None, transposed=in_out ^ w.transposed, pre=pre, post=post))


def _skip(ops, why: str) -> _Match | None:
    names = [o.name for o, _ in ops if o is not None]
    return _Match(", ".join(names), why=why) if names else None


def opaque_weights(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """2-D weights inside modules that the captured graph calls as a whole (``torch.fx`` leaves such
    as ``nn.MultiheadAttention``): their matmuls are invisible to the pass."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or _match(gm, node) is not None:
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue
        for n, p in mod.named_parameters():
            if p.dim() == 2:
                why = (f"inside {type(mod).__name__} '{node.target}', which torch.fx calls as a whole: "
                       f"pass example_inputs to capture it with torch.export; {UNCOUNTED}")
                out.append((f"{node.target}.{n}", why))
    return out


def _owner(modules: dict[str, nn.Module], gm: fx.GraphModule, param_name: str) -> tuple[nn.Module, str]:
    """The module that owns a parameter (looked up in the user's model first, for filter_fn)."""
    fqn = param_name.rpartition(".")[0]
    mod = modules.get(fqn)
    if mod is None:
        mod = gm.get_submodule(fqn) if fqn else gm
    return mod, fqn


def rewrite_linear(
    gm: fx.GraphModule,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    modules: dict[str, nn.Module] | None = None,
) -> PassResult:
    """Rewrite linear sites of ``gm`` in place; ``PassResult.sites`` lists one ``LinearSite`` per weight."""
    modules = modules or {}
    graph = gm.graph
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.Module())
    container = getattr(gm, CONTAINER)
    by_param: dict[int, LinearSite] = {}
    # a tied parameter is named by its first name (e.g. the embedding, not lm_head)
    canonical = {id(p): n for n, p in reversed(list(gm.named_parameters(remove_duplicate=False)))}
    skipped: list[tuple[str, str]] = opaque_weights(gm)
    dead: list[fx.Node] = []

    derived = lineage(gm)
    for node in list(graph.nodes):
        m = _match(gm, node)
        if m is None:
            m = _computed_weight(gm, node, derived)
        if m is None:
            continue
        if m.why is not None:
            skipped.append((_canonical_name(gm, canonical, m.param), f"{m.why} (at {node.name}; charged dense)"))
            continue
        pname = m.param
        owner, fqn = (gm.get_submodule(m.site.module), m.site.module) if m.site.module else _owner(modules, gm, pname)
        param = gm.get_parameter(pname)
        if filter_fn is not None and not filter_fn(owner, fqn):
            skipped.append((canonical.get(id(param), pname), "excluded by filter_fn; charged dense"))
            continue
        site = by_param.get(id(param))
        if site is None:
            name = canonical.get(id(param), pname)
            site = LinearSite(name, tuple(param.shape), SparseWeight(name, param))
            container.add_module(_safe(name), site.module)
            by_param[id(param)] = site
        site.uses += 1
        with graph.inserting_before(node):
            new = _emit(graph, m.site, f"{CONTAINER}.{_safe(site.name)}")
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        dead.append(node)
        if m.site.w is not None:
            dead.extend(m.site.w.chain)

    dead = list(dict.fromkeys(dead))  # the replaced nodes and their view chains, erased once unused
    while gone := [n for n in dead if not n.users]:
        for n in gone:
            graph.erase_node(n)
        dead = [n for n in dead if n not in gone]
    graph.lint()
    gm.recompile()
    other = sorted({by_param[i].name for i in outside_reads(gm, set(by_param))})
    return PassResult(gm, "linear", list(by_param.values()), skipped, other)


def _canonical_name(gm: fx.GraphModule, canonical: dict[int, str], names: str) -> str:
    """A tied parameter's first name (``names`` may list two parameters: kept as it is)."""
    try:
        return canonical.get(id(gm.get_parameter(names)), names)
    except AttributeError:
        return names


def _emit(graph: fx.Graph, m: _Site, target: str) -> fx.Node:
    """The sparse op call (and the permutes around it) that replaces the matched node."""
    if m.module is not None:  # nn.Linear module call
        mod_bias = graph.owning_module.get_submodule(m.module).bias is not None
        w, b = graph.get_attr(f"{m.module}.weight"), graph.get_attr(f"{m.module}.bias") if mod_bias else None
        return graph.call_module(target, (m.x, w, b), {"transposed": False})
    x = m.x
    if m.pre:
        x = graph.call_function(torch.einsum, (m.pre, x))
    if m.left:
        x = graph.call_function(swap_last, (x,))
    y = graph.call_module(target, (x, m.w.root, m.bias), {"transposed": m.transposed})
    if m.left:
        y = graph.call_function(swap_last, (y,))
    if m.post:
        y = graph.call_function(torch.einsum, (m.post, y))
    return y


def outside_reads(gm: fx.GraphModule, ids: set[int]) -> set[int]:
    """Which of the parameters ``ids`` (by ``id``) some node other than a SparseWeight call reads (a tied
    embedding's lookup)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            hit = param_of(gm, node)
            if hit is not None and id(hit[1]) in ids and any(
                not (u.op == "call_module" and u.target.startswith(CONTAINER + ".")) for u in node.users
            ):
                out.add(id(hit[1]))
        elif node.op == "call_module" and not node.target.startswith(CONTAINER + "."):
            # a module called as a whole (e.g. nn.Embedding under symbolic_trace) reads its own parameters
            out.update(id(p) for p in gm.get_submodule(node.target).parameters() if id(p) in ids)
    return out
