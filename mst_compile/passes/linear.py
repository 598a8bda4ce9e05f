"""Linear pass: every 2-D parameter consumed by a matmul becomes one mask-carrying sparse op (DESIGN §2).

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

A matmul whose operand is a parameter the pass cannot put in that form (another view, a weight
computed from parameters, two parameter operands, a weight hidden inside a module that ``torch.fx``
keeps as one call such as ``nn.MultiheadAttention``) is listed in ``PassResult.skipped`` with why.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..runtime.ledger import UNCOUNTED
from ..runtime.sparse_linear import SparseWeight, swap_last
from . import PassResult

aten = torch.ops.aten
# call_function targets, and call_method names as strings
LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
ADDMM = {torch.addmm, aten.addmm.default, "addmm"}
MATMUL = {operator.matmul, torch.matmul, aten.matmul.default, "matmul", torch.mm, aten.mm.default, "mm"}
BMM = {torch.bmm, aten.bmm.default, "bmm"}
EINSUM = {torch.einsum, torch.functional.einsum, aten.einsum.default}
_SAME = {"contiguous", aten.contiguous.default, aten.alias.default, aten.clone.default, "clone", "to", "type",
         "float", "half", "bfloat16", "double", aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
_T = {torch.t, aten.t.default, aten.numpy_T.default, "t"}
_TRANSPOSE = {torch.transpose, aten.transpose.int, "transpose", torch.swapaxes, "swapaxes", "swapdims"}
_PERMUTE = {torch.permute, aten.permute.default, "permute"}
_RESHAPE = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view", "reshape"}
_UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default, "unsqueeze"}
_EXPAND = {aten.expand.default, "expand"}
_VIEWS = _SAME | _T | _TRANSPOSE | _PERMUTE | _RESHAPE | _UNSQUEEZE | _EXPAND
CONTAINER = "mst_sites"


@dataclass
class LinearSite:
    """One rewritten parameter: its name, shape and the graph nodes that use it."""

    name: str  # the parameter's fully qualified name
    shape: tuple[int, ...]
    module: SparseWeight
    uses: int = 0
    kind: str = "linear"


@dataclass
class _Operand:
    """A matmul operand that is a 2-D parameter seen through views: W, Wᵀ, or W broadcast over a batch."""

    root: fx.Node  # the parameter's get_attr
    name: str
    param: nn.Parameter
    chain: list  # the view nodes between root and the operand, operand first
    transposed: bool = False  # the operand is Wᵀ
    batched: bool = False  # the operand is W.unsqueeze(0).expand(B, ...)
    why: str | None = None  # a view the pass cannot follow


@dataclass
class _Site:
    x: object  # the other operand
    w: _Operand
    bias: object = None
    transposed: bool = False  # W is stored (in, out): y = x @ W
    left: bool = False  # y = W @ x
    pre: str | None = None  # einsum equation permuting x before the sparse op
    post: str | None = None  # einsum equation permuting its output


def key(node: fx.Node):
    """The op of a call node: its function, or its method name."""
    return node.target if node.op in ("call_function", "call_method") else None


def _safe(name: str) -> str:
    return name.replace(".", "__")


def _param_of(gm: fx.GraphModule, node) -> tuple[str, nn.Parameter] | None:
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


def _step(op: _Operand, node: fx.Node, shape: list[int]) -> str | None:
    """Apply one view node to the operand's state; returns why when it is not a matrix view."""
    k, rest, nd = key(node), node.args[1:], len(shape)
    if k in _SAME:
        return None
    if k in _T or (k is getattr and rest in (("T",), ("mT",))):
        if nd != 2 and rest != ("mT",):
            return f"{node.name} transposes a {nd}-D view"
        op.transposed ^= True
    elif k in _TRANSPOSE or k in _PERMUTE:
        dims = _ints(rest)
        if dims is None:
            return f"{node.name} has symbolic dims"
        dims = [d % nd for d in dims]
        if k in _TRANSPOSE:
            dims = [dims[1] if i == dims[0] else dims[0] if i == dims[1] else i for i in range(nd)]
        swapped = list(range(nd - 2)) + [nd - 1, nd - 2]
        if dims == swapped:
            op.transposed ^= True
        elif dims != list(range(nd)):
            return f"{node.name} permutes the parameter's dims {dims}"
    elif k in _RESHAPE:
        new = _ints(rest)
        known = -math.prod(new) if new is not None and new.count(-1) == 1 else 0
        if new is None or new.count(-1) > 1 or (known and math.prod(shape) % known):
            return f"{node.name} reshapes it to a size the pass cannot check"
        if known:
            new[new.index(-1)] = math.prod(shape) // known
        if new != shape:
            return f"{node.name} views it as {tuple(new)}"
    elif k in _UNSQUEEZE and nd == 2 and rest in ((0,), (-3,)):
        op.batched = True
    elif k in _EXPAND and nd == 3:
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if len(sizes) != 3 or any(s not in (-1, d) for s, d in zip(sizes[1:], shape[1:])):
            return f"{node.name} expands the matrix dims"
    else:
        return f"{node.name} ({k}) is not a view the pass follows"
    return None


def _operand(gm: fx.GraphModule, node) -> _Operand | None:
    """Follow views from ``node`` back to a 2-D parameter; None when ``node`` is not such a view."""
    chain = []
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.args and (
            key(node) in _VIEWS or key(node) is getattr) and isinstance(node.args[0], fx.Node):
        chain.append(node)
        node = node.args[0]
    hit = _param_of(gm, node)
    if hit is None:
        return None
    op = _Operand(node, hit[0], hit[1], chain)
    for view in reversed(chain):  # root to operand
        shape = list(op.param.shape[::-1] if op.transposed else op.param.shape)
        if op.batched:
            shape = [1, *shape]
        op.why = _step(op, view, shape)
        if op.why:
            op.why = f"the operand is a view of it the pass cannot follow: {op.why}"
            break
    return op


_SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, "size", "dim", "numel"}


def _lineage(gm: fx.GraphModule) -> dict[fx.Node, frozenset | None]:
    """Per node: the 2-D parameters its value is computed from, or None when it depends on the inputs.

    Shape queries (``x.size()``, ``sym_size``) carry no values, so ``W.expand(x.size(0), ...)`` is
    still computed from W alone."""
    out: dict[fx.Node, frozenset | None] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out[n] = None
        elif n.op == "get_attr":
            hit = _param_of(gm, n)
            out[n] = frozenset([hit[0]]) if hit else frozenset()
        elif key(n) in _SHAPE_ONLY or (key(n) is getattr and n.args[1:] in (("shape",), ("dtype",), ("device",))):
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


def _computed_weight(gm: fx.GraphModule, node: fx.Node, lineage) -> tuple[str, str] | None:
    """A matmul the pass left whose operand is computed from parameters (``x @ (2 * W)``)."""
    if key(node) not in LINEAR | ADDMM | MATMUL | BMM | EINSUM:
        return None
    names = sorted(set().union(*[lineage.get(a) or () for a in node.all_input_nodes]))
    if not names:
        return None
    return ", ".join(names), "the operand is computed from the parameter, not a view of it"


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


def einsum_operands(node: fx.Node) -> tuple[object, list]:
    """(equation, operands) of an einsum node, for ``einsum(eq, a, b)`` and ``einsum(eq, [a, b])``."""
    args = node.args
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    return args[0] if args else None, ops


def _einsum_plan(w: str, x: str, out: str):
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


def _match(gm: fx.GraphModule, node: fx.Node):
    """A ``_Site`` for a rewritable node, ``(param, why)`` for a parameter matmul it cannot rewrite, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward and len(node.args) == 1 and not node.kwargs:
            return node.target
        return None
    k, args, kw = key(node), node.args, node.kwargs
    if k in LINEAR:
        x, w = args[0], args[1] if len(args) > 1 else kw.get("weight")
        b = args[2] if len(args) > 2 else kw.get("bias")
        ops, bias_ok = [(_operand(gm, x), x), (_operand(gm, w), w)], _is_vector(gm, b)
    elif k in ADDMM and len(args) == 3:
        b, x, w = args
        ops, bias_ok = [(_operand(gm, x), x), (_operand(gm, w), w)], _is_vector(gm, b)
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return _skip(ops, "addmm with alpha/beta other than 1")
    elif (k in MATMUL or k in BMM) and len(args) == 2 and not kw:
        ops, b, bias_ok = [(_operand(gm, a), a) for a in args], None, True
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
        return wo.name, wo.why or ("its bias is not 1-D" if not bias_ok else "a broadcast parameter outside bmm")
    if k in LINEAR:  # F.linear(x, Wop) = x @ Wopᵀ
        return _Site(x, wo, b, transposed=wo.transposed)
    if left:  # W @ x = swap(swap(x) @ Wᵀ)
        return _Site(x, wo, None, transposed=wo.transposed, left=True)
    return _Site(x, wo, b, transposed=not wo.transposed)  # x @ Wop


def _match_einsum(gm: fx.GraphModule, node: fx.Node):
    eq, operands = einsum_operands(node)
    ops = [(_operand(gm, o), o) for o in operands]
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
    plan = _einsum_plan(terms[i], terms[1 - i], out) if len(terms) == 2 else None
    if w.why or w.batched or plan is None:
        return w.name, w.why or f"einsum {eq!r} does not contract the parameter like a linear layer"
    in_out, pre, post = plan
    return _Site(ops[1 - i][1], w, None, transposed=in_out ^ w.transposed, pre=pre, post=post)


def _skip(ops, why: str):
    names = [o.name for o, _ in ops if o is not None]
    return (", ".join(names), why) if names else None


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

    lineage = _lineage(gm)
    for node in list(graph.nodes):
        m = _match(gm, node)
        if m is None:
            m = _computed_weight(gm, node, lineage)
        if m is None:
            continue
        if isinstance(m, tuple):
            skipped.append((_canonical_name(gm, canonical, m[0]), f"{m[1]} (at {node.name}; charged dense)"))
            continue
        if isinstance(m, str):  # an nn.Linear module call
            mod = gm.get_submodule(m)
            owner, fqn, pname = mod, m, f"{m}.weight"
        else:
            pname = m.w.name
            owner, fqn = _owner(modules, gm, pname)
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
            new = _emit(graph, node, m, f"{CONTAINER}.{_safe(site.name)}")
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        dead.append(node)
        if not isinstance(m, str):
            dead.extend(m.w.chain)

    dead = list(dict.fromkeys(dead))  # the replaced nodes and their view chains, erased once unused
    while gone := [n for n in dead if not n.users]:
        for n in gone:
            graph.erase_node(n)
        dead = [n for n in dead if n not in gone]
    graph.lint()
    gm.recompile()
    result = PassResult(gm, "linear", list(by_param.values()), skipped)
    result.other_uses = _other_uses(gm, by_param)
    return result


def _canonical_name(gm: fx.GraphModule, canonical: dict[int, str], names: str) -> str:
    """A tied parameter's first name (``names`` may list two parameters: kept as it is)."""
    try:
        return canonical.get(id(gm.get_parameter(names)), names)
    except AttributeError:
        return names


def _emit(graph: fx.Graph, node: fx.Node, m, target: str) -> fx.Node:
    """The sparse op call (and the permutes around it) that replaces ``node``."""
    if isinstance(m, str):  # nn.Linear module call
        mod_bias = graph.owning_module.get_submodule(m).bias is not None
        w, b = graph.get_attr(f"{m}.weight"), graph.get_attr(f"{m}.bias") if mod_bias else None
        return graph.call_module(target, (node.args[0], w, b), {"transposed": False})
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


def _other_uses(gm: fx.GraphModule, by_param: dict[int, LinearSite]) -> list[str]:
    """Sparse parameters that some node other than their SparseWeight call reads (tied embeddings)."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            hit = _param_of(gm, node)
            if hit is not None and id(hit[1]) in by_param and any(
                not (u.op == "call_module" and u.target.startswith(CONTAINER + ".")) for u in node.users
            ):
                names.append(by_param[id(hit[1])].name)
        elif node.op == "call_module" and not node.target.startswith(CONTAINER + "."):
            # a module called as a whole (e.g. nn.Embedding under symbolic_trace) reads its own parameters
            for p in gm.get_submodule(node.target).parameters():
                if id(p) in by_param:
                    names.append(by_param[id(p)].name)
    return sorted(set(names))
