"""Evaluate the attention-mask sub-graph of a captured model on example (or shape-derived) inputs.

Only the ancestors of the requested nodes run, so deciding whether a mask is causal costs a few
small ops, not a forward pass of the model.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.fx import _pytree as fx_pytree

from ..capture import split_inputs
from ..constants import blocks


def _ancestors(nodes) -> set[fx.Node]:
    out, todo = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(n.all_input_nodes)
    return out


def _probe_inputs(gm: fx.GraphModule, example_inputs) -> list:
    """Flat placeholder values: from ``example_inputs`` or, for exported graphs, recorded shapes."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None:
        args, kwargs = split_inputs(example_inputs)
        spec = getattr(gm, "_in_spec", None)
        if spec is not None:  # an exported module: inputs are flattened by its pytree spec
            return list(fx_pytree.tree_flatten_spec((args, kwargs), spec))
        vals = list(args) + [kwargs.get(p.target, p.args[0] if p.args else None) for p in phs[len(args):]]
        return vals
    vals = []
    for p in phs:
        fake = p.meta.get("val")
        if not isinstance(fake, torch.Tensor):
            if p.args:  # a default value
                vals.append(p.args[0])
                continue
            raise ValueError(f"no example value for input '{p.target}'")
        shape = [int(getattr(d, "node", None).hint) if isinstance(d, torch.SymInt) else int(d) for d in fake.shape]
        make = torch.randn if fake.dtype.is_floating_point else torch.ones  # ones: valid ids, no padding
        vals.append(make(shape, dtype=fake.dtype))
    return vals


class _Probe(fx.Interpreter):
    """Runs only the ancestors of the requested nodes."""

    def __init__(self, gm, needed):
        super().__init__(gm, garbage_collect_values=False)
        self.needed = needed

    def run_node(self, n):
        if n.op == "placeholder" or n in self.needed:
            return super().run_node(n)
        return None


def evaluate_masks(gm: fx.GraphModule, nodes: list[fx.Node], example_inputs) -> dict:
    """Node -> its value on ``example_inputs``, running only what the mask ``nodes`` depend on."""
    if not nodes:
        return {}
    probe = _Probe(gm, _ancestors(nodes))
    with torch.no_grad():
        probe.run(*_probe_inputs(gm, example_inputs), enable_io_processing=False)
    return {n: probe.env.get(n) for n in nodes}


def allowed_set(value: torch.Tensor, kind: str) -> torch.Tensor | str:
    """Boolean allowed-set of a mask, or a reason why it is not a pure mask."""
    if kind == "fill":
        return ~value.bool()
    if kind == "where" or value.dtype == torch.bool:
        return value.bool()
    blocked = blocks(value)
    if not bool(((value == 0) | blocked).all()):
        return "the additive attention mask is a bias (values other than 0 and -inf)"
    return ~blocked
