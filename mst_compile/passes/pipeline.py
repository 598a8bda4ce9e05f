"""The passes in their order over one captured graph: linear, attention, dense (docs/design.md §1).

``sparsify`` runs them once on the whole model's graph, or once per graph of a per-block capture
(``capture_blocks.py``), so the order lives here only.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from . import PassResult
from .attention import rewrite_attention
from .dense import wrap_dense
from .linear import rewrite_linear


def rewrite_graph(gm: fx.GraphModule, *, stride: int | None, filter_fn: Callable[[nn.Module, str], bool] | None,
                  modules: dict[str, nn.Module], example_inputs: Any) -> tuple[PassResult, PassResult]:
    """Rewrite ``gm`` in place; returns the linear and attention passes' results.

    ``modules``: the user's modules by the names ``gm`` uses (what ``filter_fn`` is shown);
    ``example_inputs``: what the attention masks are evaluated on (the inputs an exported graph was
    exported with, never size 1)."""
    lin = rewrite_linear(gm, filter_fn=filter_fn, modules=modules)
    att = rewrite_attention(gm, pattern="dense", stride=stride, example_inputs=example_inputs)
    wrap_dense(gm)  # what stays dense is charged dense on both sides of the ledger
    return lin, att
