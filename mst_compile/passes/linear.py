"""Linear pass: every 2-D parameter consumed by a linear/matmul op becomes one mask-carrying sparse op.

Pattern matched (the weight operand must be a ``get_attr`` of a 2-D ``nn.Parameter``, or the site a
call of an ``nn.Linear`` module):

    call_module   nn.Linear(x)                          -> sparse(x, W, b)
    call_function F.linear / aten.linear(x, W, b?)      -> sparse(x, W, b)
    call_function addmm(b, x, W)  (HF Conv1D, W: in×out) -> sparse(x, W, b, transposed=True)
    call_function mm / matmul(x, W)                     -> sparse(x, W, None, transposed=True)

Produced: ``call_module mst_sites.<weight>(x, get_attr W, get_attr b, transposed=...)`` where
``mst_sites.<weight>`` is the ``SparseWeight`` of that parameter. A parameter used at several sites
(a tied ``lm_head``) gets one ``SparseWeight``, so all uses share one mask; a parameter that also has
non-linear uses (the token embedding of a tied ``lm_head``) is reported in ``PassResult.other_uses``
so the runtime can mask its gradient there too.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..runtime.sparse_linear import SparseWeight
from . import PassResult

aten = torch.ops.aten
_LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
_ADDMM = {torch.addmm, aten.addmm.default}
_MM = {torch.mm, torch.matmul, operator.matmul, aten.mm.default, aten.matmul.default}
CONTAINER = "mst_sites"


@dataclass
class LinearSite:
    """One rewritten parameter: its name, shape and the graph nodes that use it."""

    name: str  # the parameter's fully qualified name
    shape: tuple[int, ...]
    module: SparseWeight
    uses: int = 0
    kind: str = "linear"


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


def _owner(modules: dict[str, nn.Module], gm: fx.GraphModule, param_name: str) -> tuple[nn.Module, str]:
    """The module that owns a parameter (looked up in the user's model first, for filter_fn)."""
    fqn = param_name.rpartition(".")[0]
    mod = modules.get(fqn)
    if mod is None:
        mod = gm.get_submodule(fqn) if fqn else gm
    return mod, fqn


def _match(gm: fx.GraphModule, node: fx.Node):
    """Return (x, weight_node_or_target, bias, transposed) for a linear-like node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Linear and len(node.args) == 1 and not node.kwargs:
            return node.args[0], f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None), False
        return None
    if node.op != "call_function":
        return None
    args, kw = node.args, node.kwargs
    if node.target in _LINEAR:
        w = args[1] if len(args) > 1 else kw.get("weight")
        b = args[2] if len(args) > 2 else kw.get("bias")
        if _param_of(gm, w):
            return args[0], w, b, False
    elif node.target in _ADDMM and len(args) == 3 and kw.get("beta", 1) == 1 and kw.get("alpha", 1) == 1:
        b, x, w = args
        if _param_of(gm, w) and _is_vector(gm, b):
            return x, w, b, True
    elif node.target in _MM and len(args) == 2 and not kw:
        x, w = args
        if _param_of(gm, w) and not _param_of(gm, x):
            return x, w, None, True
    return None


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
    skipped: list[tuple[str, str]] = []
    replaced: list[fx.Node] = []

    for node in list(graph.nodes):
        m = _match(gm, node)
        if m is None:
            continue
        x, w, b, transposed = m
        with graph.inserting_before(node):
            w_node = w if isinstance(w, fx.Node) else graph.get_attr(w)
            b_node = graph.get_attr(b) if isinstance(b, str) else b
        pname, param = _param_of(gm, w_node)
        owner, fqn = (gm.get_submodule(node.target), node.target) if node.op == "call_module" else _owner(modules, gm, pname)
        if filter_fn is not None and not filter_fn(owner, fqn):
            skipped.append((pname, "excluded by filter_fn"))
            if w_node is not w:
                graph.erase_node(w_node)
            if b_node is not b and b_node is not None:
                graph.erase_node(b_node)
            continue
        site = by_param.get(id(param))
        if site is None:
            pname = canonical.get(id(param), pname)
            site = LinearSite(pname, tuple(param.shape), SparseWeight(pname, param))
            container.add_module(_safe(pname), site.module)
            by_param[id(param)] = site
        site.uses += 1
        with graph.inserting_before(node):
            new = graph.call_module(f"{CONTAINER}.{_safe(site.name)}", (x, w_node, b_node), {"transposed": transposed})
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        replaced.append(node)

    for node in replaced:
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    result = PassResult(gm, "linear", list(by_param.values()), skipped)
    result.other_uses = _other_uses(gm, by_param)
    return result


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
