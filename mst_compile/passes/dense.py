"""Dense-site pass: every matmul and attention op the other passes left becomes a counted ``DenseOp``.

Run after the linear and attention passes. What is left are activation matmuls (the scores of an
attention site that was not rewritten), weights a user excluded with ``filter_fn`` and parameter
matmuls the linear pass listed in ``skipped``. Each becomes
``call_module mst_dense.op_<i>(*args, **kwargs)``, which calls the original op, so the ledger charges
it at dense cost on both sides (docs/design.md §6). ``finalize`` puts the original ops back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..constants import DENSE_CONTAINER
from ..ops.dense_op import DenseOp
from . import PassResult
from ._operands import einsum_operands, is_linear_module
from ._ops import ADDMM, BADDBMM, BMM, EINSUM, LINEAR, MATMUL, SDPA, key

CONTAINER = DENSE_CONTAINER


def _kind(node: fx.Node) -> str | None:
    k = key(node)
    if k is None or (k in EINSUM and len(einsum_operands(node)[1]) < 2):  # a one-operand einsum only permutes
        return None
    for kind, ops in (("linear", LINEAR), ("addmm", ADDMM | BADDBMM), ("matmul", MATMUL | BMM), ("einsum", EINSUM),
                      ("sdpa", SDPA)):
        if k in ops:
            return kind
    return None


def wrap_dense(gm: fx.GraphModule) -> PassResult:
    """Wrap the remaining matmul/attention nodes of ``gm`` in ``DenseOp`` modules (in place)."""
    graph = gm.graph
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.Module())
    container = gm.get_submodule(CONTAINER)
    result = PassResult(gm, "dense")
    for node in list(graph.nodes):
        args, kwargs = node.args, node.kwargs
        if node.op == "call_module" and is_linear_module(gm.get_submodule(node.target)) and len(args) == 1:
            kind, fn = "linear", F.linear  # an nn.Linear left dense: call F.linear on its parameters
            with graph.inserting_before(node):
                bias = graph.get_attr(f"{node.target}.bias") if gm.get_submodule(node.target).bias is not None else None
                args, kwargs = (args[0], graph.get_attr(f"{node.target}.weight"), bias), {}
        else:
            kind = _kind(node)
            if kind is None:
                continue
            fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        slot = f"op_{len(list(container.children()))}"
        module = DenseOp(node.name, kind, fn)
        container.add_module(slot, module)
        with graph.inserting_before(node):
            new = graph.call_module(f"{CONTAINER}.{slot}", args, kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        result.sites.append(module)
    graph.lint()
    gm.recompile()
    return result
