"""Per-block capture: ``sparsify(model, ..., blocks="auto" | "transformer.h")``.

``blocks="auto"`` (the default) captures per block where the model allows it: one ``nn.ModuleList`` of
same-class blocks holding its weight matmuls, a forward that only calls them, and pieces that
``torch.fx`` traces and sees inside, or that ``torch.export`` captures (given ``example_inputs``).
Otherwise it falls back to whole-model capture and keeps why in
``sm.meta[WHOLE_META]`` (``mstc inspect`` prints it); a named path never falls back, it is refused.

Whole-model capture (``capture.py``) gives one graph that reads every weight directly, so nothing
of the model's module tree is left to wrap per block. Here each child of the blocks'
``nn.ModuleList`` is traced on its own (``torch.fx.symbolic_trace``) and rewritten by the same passes
(``passes/pipeline.py``); the top level is traced with the blocks as leaves, so its graph calls
``call_module transformer.h.<i>``, and the rewritten blocks take the children's places: ``sm``'s
parameter names are the model's and ``sm.get_submodule("transformer.h.3")`` is rewritten block 3.

The pieces' results are merged into what whole-model capture gives: sites named by their full
names (a tied weight by its first name), in the order the inlined graph uses them (which the
allocation and the random growth follow), one ``SparseWeight`` per parameter however many pieces
use it, and the sparse weights read outside their sparse op (a tied embedding) found over all
pieces. Where fx cannot capture a piece (or sees a block weight only inside a module it calls as a
whole), the pieces come from the whole model's ``torch.export`` graph cut at the blocks
(``capture_split.py``), given ``example_inputs``; without them that is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from .capture_split import WHOLE, block_inputs, split_exported
from .constants import ATTENTION_CONTAINER, BLOCKS_META, SPARSE_CONTAINER
from .errors import CaptureError
from .passes import PassResult
from .passes.linear import LinearSite, opaque_weights, outside_reads
from .passes.pipeline import rewrite_graph

_EXPORT = f"pass example_inputs (torch.export then captures it per block) or {WHOLE}"


def find_blocks(model: nn.Module, blocks: Any) -> tuple[str, nn.ModuleList]:
    """The dotted path of the blocks' ``nn.ModuleList`` and the list; ``"auto"`` finds it."""
    if not isinstance(blocks, str):
        raise TypeError(f"sparsify: blocks must be None, 'auto' or the dotted path of an nn.ModuleList, got "
                        f"{type(blocks).__name__}")
    name = type(model).__name__
    path = _auto(model) if blocks == "auto" else blocks
    try:
        ml = model.get_submodule(path) if path else model
    except AttributeError:
        raise ValueError(f"sparsify: blocks={blocks!r}: {name} has no submodule {path!r}; pass the dotted path of its "
                         "nn.ModuleList of blocks (e.g. 'transformer.h'), 'auto', or None") from None
    if not isinstance(ml, nn.ModuleList) or not path:
        raise ValueError(f"sparsify: blocks={blocks!r} is {'the model' if not path else 'a ' + type(ml).__name__}, not an "
                         "nn.ModuleList of blocks; pass the dotted path of the ModuleList that holds them, 'auto', or None")
    if len(ml) == 0 or len({id(b) for b in ml}) != len(ml):
        raise ValueError(f"sparsify: blocks={blocks!r} is {'empty' if len(ml) == 0 else 'a list holding one module twice'}; "
                         f"per-block capture needs distinct blocks: {WHOLE}")
    return path, ml


def _holds_matmuls(m: nn.Module) -> bool:
    return any(isinstance(s, nn.Linear) or type(s).__name__ == "Conv1D" for s in m.modules())


def _auto(model: nn.Module) -> str:
    """The one ``nn.ModuleList`` of same-class blocks holding linear layers that no other one holds."""
    found = [n for n, m in model.named_modules()
             if n and isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
             and not isinstance(m[0], nn.Linear) and all(_holds_matmuls(b) for b in m)]
    top = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    if len(top) != 1:
        what = f"several block lists ({', '.join(top)})" if top else \
            "no nn.ModuleList of same-class blocks that hold linear layers"
        raise ValueError(f"sparsify: blocks='auto' found {what} in {type(model).__name__}; pass blocks='<dotted path "
                         "of the ModuleList>' or blocks=None")
    return top[0]


class _LeafTracer(fx.Tracer):
    """The default tracer, with the blocks called as a whole."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _trace_top(model: nn.Module, path: str, ml: nn.ModuleList) -> fx.GraphModule:
    """The model's graph with every block a ``call_module``; the blocks in it are param-less stubs
    until the rewritten ones are put in (so the top-level passes see no block weights)."""
    tracer = _LeafTracer({id(b) for b in ml})
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise CaptureError(f"sparsify: cannot capture {type(model).__name__} with its blocks {path!r} as leaves: "
                           f"torch.fx.symbolic_trace failed ({_first_line(e)})") from None
    names = {f"{path}.{i}" for i in range(len(ml))}
    for node in graph.nodes:
        inside = next((b for b in names if isinstance(node.target, str) and node.target.startswith(b + ".")), None)
        if node.op in ("call_module", "get_attr") and inside:
            raise CaptureError(f"sparsify: {type(model).__name__}'s forward reads {node.target!r} inside block {inside!r} "
                               f"instead of calling the block; per-block capture needs blocks used only by calling them")
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    missing = sorted(names - called)
    if missing:
        raise CaptureError(f"sparsify: {type(model).__name__}'s forward never calls block {missing[0]!r}; per-block "
                           f"capture needs every block of {path!r} called")
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.set_submodule(path, nn.ModuleList(nn.Module() for _ in ml))
    return gm



def _trace_block(block: nn.Module, name: str) -> fx.GraphModule:
    """The block's own graph, its nodes' module stacks named from the model's root (as whole-model
    capture names them: attention sites are named by them)."""
    try:
        gm = fx.symbolic_trace(block)
    except Exception as e:
        raise CaptureError(f"sparsify: cannot capture block {name!r} ({type(block).__name__}) with torch.fx.symbolic_trace "
                           f"({_first_line(e)})") from None
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        node.meta["nn_module_stack"] = {name: (name, type(block)),
                                        **{f"{name}.{k}": (f"{name}.{v[0]}", v[1]) for k, v in stack.items()}}
    return gm


def _walk(top: fx.GraphModule, pieces: dict[str, fx.GraphModule]):
    """``(graph module, node)`` in the order of the inlined graph: each block call is its block's nodes."""
    for node in top.graph.nodes:
        if node.op == "call_module" and node.target in pieces:
            yield from ((pieces[node.target], n) for n in pieces[node.target].graph.nodes)
        else:
            yield top, node


def sparsify_auto(model: nn.Module, *, stride: int | None, filter_fn: Callable[[nn.Module, str], bool] | None,
                  example_inputs: Any) -> tuple[tuple[fx.GraphModule, PassResult, PassResult, str] | None, str]:
    """``blocks="auto"``: :func:`sparsify_blocks` on the block list :func:`find_blocks` detects, or
    ``(None, why)`` when the model has none or a piece cannot be captured (whole-model capture follows)."""
    try:
        path, _ = find_blocks(model, "auto")
        return sparsify_blocks(model, path, stride=stride, filter_fn=filter_fn, example_inputs=example_inputs), ""
    except (ValueError, CaptureError) as e:  # the model is not rewritten in place, so nothing is left half-done
        why = str(e).removeprefix("sparsify: ").removesuffix(f": {_EXPORT}").removesuffix(f": {WHOLE}")
        return None, why.split("; pass blocks=")[0]  # the refusal, not its advice


def sparsify_blocks(model: nn.Module, blocks: Any, *, stride: int | None,
                    filter_fn: Callable[[nn.Module, str], bool] | None,
                    example_inputs: Any) -> tuple[fx.GraphModule, PassResult, PassResult, str]:
    """Capture ``model`` per block, rewrite every piece, and merge: ``(sm, linear result, attention result, how)``
    as whole-model capture's passes would give them (site names, order, one SparseWeight per weight);
    ``how`` is ``"fx"``, or ``"export"`` where fx cannot capture a piece and ``example_inputs`` are given."""
    path, ml = find_blocks(model, blocks)
    try:
        top, pieces, inputs, how = *_capture_fx(model, path, ml, example_inputs), "fx"
    except CaptureError as e:
        if example_inputs is None:
            raise CaptureError(f"{e}: {_EXPORT}") from None
        try:
            top, pieces, inputs = split_exported(model, path, ml, example_inputs)
        except CaptureError:
            raise
        except Exception as e:  # a graph the cut does not foresee: whole-model capture still takes the model
            raise CaptureError(f"sparsify: cutting {type(model).__name__}'s exported graph at its blocks {path!r} failed "
                               f"({_first_line(e)}): {WHOLE}") from None
        how = "export"
    results = {"": rewrite_graph(top, stride=stride, filter_fn=filter_fn, modules=dict(model.named_modules()),
                                 example_inputs=top.meta.get("example_inputs", example_inputs))}
    for (name, gm), block, seen in zip(pieces.items(), ml, inputs):
        def keep(module, fqn, name=name):
            return filter_fn(module, f"{name}.{fqn}" if fqn else name)
        results[name] = rewrite_graph(gm, stride=stride, filter_fn=filter_fn and keep,
                                      modules=dict(block.named_modules()), example_inputs=seen)
    lin_sites, att_sites = _merge_in_order(top, pieces, results)
    other = set().union(*(outside_reads(g, set(lin_sites)) for g in [top, *pieces.values()]))
    top.set_submodule(path, nn.ModuleList(pieces.values()))  # the rewritten blocks in the children's places
    top.meta[BLOCKS_META] = path
    canonical = {id(p): n for n, p in reversed(list(top.named_parameters(remove_duplicate=False)))}
    for pid, site in lin_sites.items():
        site.name = site.module.name = canonical[pid]
    skipped = [(_full_name(pieces.get(n, top), canonical, s), why) for n, (lin, _) in results.items() for s, why in lin.skipped]
    lin = PassResult(top, "linear", list(lin_sites.values()), skipped, sorted(canonical[i] for i in other))
    att = PassResult(top, "attention", att_sites, [s for _, a in results.values() for s in a.skipped])
    return top, lin, att, how


def _capture_fx(model: nn.Module, path: str, ml: nn.ModuleList,
                example_inputs: Any) -> tuple[fx.GraphModule, dict[str, fx.GraphModule], list]:
    """``(top, pieces, inputs)`` by ``torch.fx``: the top level traced with the blocks as leaves, each
    block traced on its own, each block's inputs in one forward of ``example_inputs``."""
    top = _trace_top(model, path, ml)
    names = [f"{path}.{i}" for i in range(len(ml))]
    pieces = {n: _trace_block(b, n) for n, b in zip(names, ml)}
    hidden = [f"{n}.{w}" for n, gm in [("", top), *pieces.items()] for w, _ in opaque_weights(gm)] \
        if example_inputs is not None else []
    if hidden:  # torch.export sees inside them
        raise CaptureError(f"sparsify: weight {hidden[0].lstrip('.')!r} sits in a module torch.fx calls as a whole")
    return top, pieces, block_inputs(model, ml, example_inputs)


def _merge_in_order(top: fx.GraphModule, pieces: dict[str, fx.GraphModule],
                    results: dict[str, tuple[PassResult, PassResult]]) -> tuple[dict[int, LinearSite], list]:
    """Every piece's sites in the inlined graph's order: linear sites by parameter (one SparseWeight
    each, put in every piece that uses the parameter), attention sites as they come."""
    by_module, attention = {}, {}
    for name, (lin, att) in results.items():
        gm = pieces.get(name, top)
        by_module.update({id(s.module): (gm.get_parameter(s.name), s) for s in lin.sites})
        attention.update({id(s.module): s for s in att.sites})
    lin_sites: dict[int, LinearSite] = {}
    att_sites: list = []
    for gm, node in _walk(top, pieces):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if node.target.startswith(SPARSE_CONTAINER + ".") and id(mod) in by_module:
            param, site = by_module.pop(id(mod))
            first = lin_sites.setdefault(id(param), LinearSite(site.name, site.shape, site.module))
            first.uses += site.uses
            if first.module is not mod:  # the parameter's SparseWeight from an earlier piece, shared
                gm.get_submodule(SPARSE_CONTAINER).register_module(node.target.partition(".")[2], first.module)
        elif node.target.startswith(ATTENTION_CONTAINER + ".") and id(mod) in attention:
            att_sites.append(attention.pop(id(mod)))
    return lin_sites, att_sites


def _full_name(gm: fx.GraphModule, canonical: dict[int, str], names: str) -> str:
    """A skipped site's parameter names (comma-separated) by their names in the whole model."""
    def full(n: str) -> str:
        try:
            return canonical.get(id(gm.get_parameter(n)), n)
        except AttributeError:
            return n
    return ", ".join(full(n) for n in names.split(", "))
