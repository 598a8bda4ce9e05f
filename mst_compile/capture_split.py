"""Per-block capture through torch.export: the whole model's exported graph, cut at its blocks.

Pattern: ``torch.export`` gives one flat graph (``capture.py``) whose nodes carry the path of the
module they ran in (``nn_module_stack``). The nodes of block i (``<path>.i`` and below) are one run
of consecutive nodes; each run becomes its own GraphModule, reading its weights by their names in the
block, and the flat graph calls it as ``call_module <path>.i``. That is the top-level graph and the
blocks that ``torch.fx`` per-block capture gives (``capture_blocks.py``), for the models fx cannot
trace (Hugging Face transformers v5) or whose blocks hold modules fx calls as a whole.

Refused with one CaptureError line: a block whose nodes are not one run (the model computes
something of its own between a block's ops), and a weight read inside a block that the block does
not hold.
"""
from __future__ import annotations

import inspect
import operator
from operator import attrgetter
from typing import Any

import torch
from torch import fx, nn

from .capture import capture, inference, split_inputs
from .constants import SHAPES_META
from .errors import CaptureError
from .passes.attention import depends_on_data

WHOLE = "use blocks=None (whole-model capture)"


def split_exported(model: nn.Module, path: str, ml: nn.ModuleList,
                   example_inputs: Any) -> tuple[fx.GraphModule, dict[str, fx.GraphModule], list]:
    """``(top, pieces, inputs)``: the exported top-level graph calling ``call_module <path>.<i>`` (its
    blocks param-less stubs until the rewritten pieces are put in, as ``capture_blocks._trace_top``
    leaves them), each block's GraphModule by its full name, and each block's inputs in the export's
    example forward (what its attention masks are evaluated on)."""
    top, _ = capture(model, example_inputs, fx=False)
    names = [f"{path}.{i}" for i in range(len(ml))]
    runs = _runs(top, names, type(model).__name__)
    pieces = {name: _cut(top, name, block, runs[name]) for name, block in zip(names, ml)}
    _outside_blocks(top, model, names)
    top.graph.lint()
    top.recompile()
    top.set_submodule(path, nn.ModuleList(pieces.values()))
    inputs = block_inputs(top, top.get_submodule(path), top.meta["example_inputs"])
    top.set_submodule(path, nn.ModuleList(nn.Module() for _ in ml))
    return top, pieces, inputs


def _outside_blocks(top: fx.GraphModule, model: nn.Module, names: list[str]) -> None:
    """The top level's reads of tensors by names outside the blocks (whose subtrees the pieces replace):
    a weight tied between the top level and a block by its top-level name, else refused."""
    under = tuple(n + "." for n in names)
    outside = {id(t): n for n, t in reversed([*model.named_parameters(remove_duplicate=False),
                                              *model.named_buffers(remove_duplicate=False)]) if not n.startswith(under)}
    for node in [n for n in top.graph.nodes if n.op == "get_attr"]:
        if not node.users:
            top.graph.erase_node(node)
        elif node.target.startswith(under):
            name = outside.get(id(attrgetter(node.target)(top)))
            if name is None:
                block = next(n for n in names if node.target.startswith(n + "."))
                raise CaptureError(f"sparsify: {type(model).__name__}'s forward reads {node.target!r} inside block "
                                   f"{block!r} instead of calling the block; per-block capture needs blocks used only by "
                                   f"calling them: {WHOLE}")
            node.target = name


def _block_of(node: fx.Node, names: set[str]) -> str | None:
    """The block a node ran in (the outermost ``<path>.<i>`` of its module stack), else None."""
    for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = str(fqn).split("@")[0].split(".")  # "h.0@1": block h.0's second call
        for k in range(1, len(parts) + 1):
            if ".".join(parts[:k]) in names:
                return ".".join(parts[:k])
    return None


def _runs(top: fx.GraphModule, names: list[str], model: str) -> dict[str, list[fx.Node]]:
    """Each block's nodes, checked to be one run of consecutive computing nodes."""
    order = [n for n in top.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    blocks = set(names)
    owner = [_block_of(n, blocks) if n.op == "call_function" else None for n in order]  # export's _guards_fn: top
    runs: dict[str, list[fx.Node]] = {n: [] for n in names}
    last: dict[str, int] = {}
    for i, (node, name) in enumerate(zip(order, owner)):
        if name is None:
            continue
        if name in last and last[name] != i - 1:
            j = next(j for j in range(last[name] + 1, i) if owner[j] != name)
            raise CaptureError(f"sparsify: block {name!r} of {model} does not run as one piece in its exported graph (op "
                               f"{order[j].name!r} of {owner[j] or 'the top level'} runs between its ops: a block called twice, "
                               f"or a forward that computes inside a block's run); per-block capture through torch.export "
                               f"needs each block to run once, in one piece: {WHOLE}")
        runs[name].append(node)
        last[name] = i
    empty = [n for n in names if not runs[n]]
    if empty:
        raise CaptureError(f"sparsify: {model}'s exported graph runs nothing in block {empty[0]!r}; per-block capture "
                           f"needs every block called: {WHOLE}")
    return runs


def _cut(top: fx.GraphModule, name: str, block: nn.Module, nodes: list[fx.Node]) -> fx.GraphModule:
    """Move ``nodes`` (block ``name``'s run) into a GraphModule of their own, called from ``top`` in their place."""
    inside = set(nodes)
    external: dict[fx.Node, None] = {}
    for node in nodes:
        external.update((x, None) for x in node.all_input_nodes if x not in inside and x.op != "get_attr")
    graph, env, attrs = fx.Graph(), {}, {}
    for x in external:
        env[x] = graph.placeholder(x.name)
        env[x].meta.update({k: v for k, v in x.meta.items() if k in ("val", "tensor_meta")})
        env[x].meta[SHAPES_META] = not depends_on_data(x)  # e.g. the causal mask the top level builds for all blocks
    held = {id(t): n for n, t in reversed([*block.named_parameters(remove_duplicate=False),
                                           *block.named_buffers(remove_duplicate=False)])}  # a tied tensor by its first name

    def arg(x: fx.Node) -> fx.Node:
        if x in env:
            return env[x]
        value = attrgetter(x.target)(top)  # a get_attr of the flat graph: the same tensor, by its name in the block
        local = held.get(id(value))
        if local is None and isinstance(value, nn.Parameter):
            raise CaptureError(f"sparsify: block {name!r} reads parameter {x.target!r}, which it does not hold; per-block "
                               f"capture needs each block's weights inside it: {WHOLE}")
        local = local or x.target.replace(".", "_")  # a constant torch.export lifted out: the piece keeps its own
        attrs[local] = value
        env[x] = graph.get_attr(local)
        env[x].meta.update(x.meta)
        return env[x]

    for node in nodes:
        env[node] = graph.node_copy(node, arg)
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    graph.output(env[outs[0]] if len(outs) == 1 else tuple(env[n] for n in outs))
    piece = fx.GraphModule(attrs, graph, type(block).__name__)
    for local, value in attrs.items():  # buffers: persistent (in the state dict) exactly where the block's are
        if not isinstance(value, nn.Parameter):
            owner, _, leaf = local.rpartition(".")
            persistent = local in held.values() and leaf not in block.get_submodule(owner)._non_persistent_buffers_set
            piece.get_submodule(owner).register_buffer(leaf, value, persistent=persistent)
    _order_like(piece, block)
    with top.graph.inserting_before(nodes[0]):
        call = top.graph.call_module(name, tuple(external))
        results = [call] if len(outs) == 1 else [top.graph.call_function(operator.getitem, (call, k)) for k in range(len(outs))]
    for node, result in zip(outs, results):
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        top.graph.erase_node(node)
    return piece


def _order_like(module: nn.Module, like: nn.Module) -> None:
    """Put ``module``'s submodules, parameters and buffers in ``like``'s order (the graph's order of use
    made them), so the piece's ``named_parameters()`` and state dict list them as the model does."""
    for table in ("_modules", "_parameters", "_buffers"):
        mine, theirs = getattr(module, table), getattr(like, table)
        order = {k: i for i, k in enumerate(theirs)}
        setattr(module, table, dict(sorted(mine.items(), key=lambda kv: order.get(kv[0], len(order)))))
    for name, child in module._modules.items():
        if name in like._modules and child is not None:
            _order_like(child, like._modules[name])


def block_inputs(model: nn.Module, ml: nn.ModuleList, example_inputs: Any) -> list:
    """Each block's inputs in one forward of ``example_inputs`` (what its attention masks are evaluated
    on), in ``split_inputs``' form; ``None`` each without example inputs or when that forward fails."""
    seen: list = [None] * len(ml)
    if example_inputs is None:
        return seen

    def record(i: int):
        def hook(mod, args, kwargs):
            if seen[i] is None and not kwargs:
                seen[i] = tuple(args)
            elif seen[i] is None:  # by name, as the block's graph names its placeholders
                sig = inspect.signature(mod.forward)
                bound = sig.bind(*args, **kwargs).arguments
                var = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
                seen[i] = {**{n: v for n, v in bound.items() if n != var}, **bound.get(var, {})}
        return hook

    hooks = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(ml)]
    args, kwargs = split_inputs(example_inputs)
    try:
        with torch.no_grad(), inference(model):
            model(*args, **kwargs)
    except Exception:  # the masks are then reported as not evaluated, as without example inputs
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen
