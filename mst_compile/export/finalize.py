"""finalize(sm): fold the masks into the weights and put plain ops back.

The result is an ordinary ``GraphModule`` with no mst ops in it: every sparse weight site becomes
``F.linear`` (or ``matmul`` + ``add`` for weights stored (in, out), HF ``Conv1D``), every counted
dense op its original op, and every attention
site becomes plain causal SDPA (``dense``) or the exportable skipping computation of its pattern
(``export/attention.py``). It shares its parameters with ``sm``, and so with the user's model, which
keeps the sparse weights. ``sm`` itself is left as it is: training can go on after a finalize.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..constants import ATTENTION_CONTAINER, ATTENTION_PATTERNS, BLOCKS_META, DENSE_CONTAINER, SPARSE_CONTAINER, default_stride
from ..errors import MstCompileError
from .attention import export_attention

SITES = SPARSE_CONTAINER + "."  # call_module targets of the sparse weight sites
ATTN = ATTENTION_CONTAINER + "."  # call_module targets of the attention sites
DENSE = DENSE_CONTAINER + "."  # call_module targets of the counted dense ops


def is_sparsified(module) -> bool:
    """True for a module returned by ``mst_compile.sparsify`` (it carries the ``.mst`` handle)."""
    return isinstance(module, fx.GraphModule) and hasattr(module, "mst")


def pieces(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and, for a per-block ``sm`` (``sparsify(..., blocks=...)``), each of its rewritten blocks."""
    path = gm.meta.get(BLOCKS_META)
    return [gm, *(gm.get_submodule(path) if path else ())]


def graph_attention_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Attention site name -> its module, for every ``mst_attn.*`` node of the graph (and of its blocks)."""
    out = {}
    for piece in pieces(gm):
        for n in piece.graph.nodes:
            if n.op == "call_module" and n.target.startswith(ATTN):
                mod = piece.get_submodule(n.target)
                out[getattr(mod, "site", n.target)] = mod
    return out


def resolve_attention(gm: fx.GraphModule, attention: str | dict | None) -> dict[str, tuple[str, int | None]]:
    """Site name -> (pattern, stride) to export. ``None`` keeps each site's current pattern."""
    sites = graph_attention_modules(gm)
    if attention is None:
        return {n: (m.pattern, m.stride) for n, m in sites.items()}
    if isinstance(attention, str):
        attention = {n: attention for n in sites}
    if not isinstance(attention, dict):
        raise TypeError(f"attention must be None, a pattern name or a dict site -> pattern, got {type(attention).__name__}")
    unknown = sorted(set(attention) - set(sites))
    if unknown:
        raise ValueError(f"attention: unknown attention sites {unknown}; the model's sites are {sorted(sites)}")
    for name, p in attention.items():
        if p not in ATTENTION_PATTERNS:
            raise ValueError(f"attention[{name!r}]={p!r} is invalid: expected one of {', '.join(ATTENTION_PATTERNS)}")
    return {n: (attention.get(n, m.pattern), m.stride) for n, m in sites.items()}


def trained_attention(gm: fx.GraphModule, block_size: int | None) -> dict[str, tuple[str, int | None]]:
    """Site name -> (pattern, stride) that each site ran at the ``block_size`` tokens the model trained on.

    A stride left at T/8 becomes ``block_size // 8`` and a widened one (``attention_restore="widen"``)
    its widened value, so every query keeps the keys it attended in training at any length, and a
    prefix's outputs do not depend on what follows it (what generation needs)."""
    out = {}
    for name, m in graph_attention_modules(gm).items():
        if m.pattern == "dense":
            out[name] = ("dense", None)
            continue
        if m.stride is None and block_size is None:
            raise MstCompileError(
                f"attention site {name!r} trained with the default stride, T/8 of the sequence length: give the "
                "length the model trained at (block_size=...) to fix the stride it trained with")
        out[name] = (m.pattern, math.ceil((m.stride or default_stride(block_size)) * m.stride_scale))
    return out


@contextlib.contextmanager
def pinned(gm: fx.GraphModule, chosen: dict[str, tuple[str, int | None]]):
    """Run ``gm``'s attention sites with ``chosen``'s patterns and strides, unwidened (what ``finalize``
    writes); restored on exit."""
    sites = graph_attention_modules(gm) if is_sparsified(gm) else {}
    saved = {n: (m.pattern, m.stride, m.stride_scale) for n, m in sites.items()}
    try:
        for n, (p, s) in chosen.items():
            sites[n].set_pattern(p, stride=s)
            sites[n].stride_scale = 1.0
        yield
    finally:
        for n, (p, s, scale) in saved.items():
            sites[n].set_pattern(p, stride=s)
            sites[n].stride_scale = scale


@torch.no_grad()
def finalize(sm: fx.GraphModule, *, attention: str | dict | None = None) -> fx.GraphModule:
    """Return a plain-op copy of the sparsified module ``sm`` with the masks folded into the weights.

    ``attention``: ``None`` exports each attention site with the pattern active now (dense causal
    after restoration); a pattern name (``dense``, ``local``, ``strided``, ``sparse``) or a dict
    ``{site: pattern}`` overrides it. Strides are the sites' own (``None``: T/8 of the running length).
    """
    if not is_sparsified(sm):
        raise TypeError(
            f"finalize expects the module returned by mst_compile.sparsify (a GraphModule with .mst), got "
            f"{type(sm).__name__}; a plain model needs no finalize: export it as it is"
        )
    chosen = resolve_attention(sm, attention)
    sm.mst.apply_masks()  # already zero where masked (the runtime's invariant), made certain here
    out = fx.GraphModule(sm, _plain_graph(sm, chosen), class_name="Finalized")
    path = sm.meta.get(BLOCKS_META)
    if path:  # per-block: each block finalized on its own, in its place (names stay the model's)
        blocks = nn.ModuleList(fx.GraphModule(b, _plain_graph(b, chosen), class_name="FinalizedBlock")
                               for b in sm.get_submodule(path))
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, name, blocks)
    out.train(sm.training)
    return out


def _plain_graph(gm: fx.GraphModule, chosen: dict[str, tuple[str, int | None]]) -> fx.Graph:
    """A copy of ``gm``'s graph with every mst op replaced by its plain op (``chosen``: the attention)."""
    with warnings.catch_warnings():
        # copying the pytree spec of a torch.export-captured graph rebuilds torch's own LeafSpec, which
        # torch 2.13 then warns is deprecated: torch's internals, nothing the user can act on
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
        graph = copy.deepcopy(gm.graph)  # keeps the pytree codegen of torch.export-captured modules
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        if node.target.startswith(SITES):
            _replace(graph, node, _plain_linear(graph, node))
        elif node.target.startswith(DENSE):  # the original op, no longer counted
            with graph.inserting_before(node):
                new = graph.call_function(gm.get_submodule(node.target).fn, node.args, node.kwargs)
            _replace(graph, node, new)
        elif node.target.startswith(ATTN):
            mod = gm.get_submodule(node.target)
            site = getattr(mod, "site", node.target)
            pattern, stride = chosen[site]
            if pattern != "dense" and node.kwargs.get("attn_mask") is not None:
                raise ValueError(
                    f"attention site {site!r} takes a padding mask from the model's inputs, which the exported "
                    f"{pattern!r} pattern cannot apply; export with example inputs that have no attention mask, "
                    "or with attention='dense'"
                )
            with graph.inserting_before(node):
                new = graph.call_function(export_attention, node.args, {**node.kwargs, "pattern": pattern, "stride": stride})
            _replace(graph, node, new)
    graph.lint()
    return graph


def _plain_linear(graph: fx.Graph, node: fx.Node) -> fx.Node:
    x, w, b = (list(node.args) + [None, None])[:3]
    b = node.kwargs.get("bias", b)
    with graph.inserting_before(node):
        if node.kwargs.get("transposed", False):  # weight stored (in, out): y = x @ W + b
            y = graph.call_function(torch.matmul, (x, w))
            return graph.call_function(torch.add, (y, b)) if b is not None else y
        return graph.call_function(F.linear, (x, w, b))


def _replace(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
    old.replace_all_uses_with(new)
    graph.erase_node(old)

