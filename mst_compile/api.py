"""The public verbs: ``sparsify`` a model into a trainable MST module."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .capture import capture
from .capture_blocks import sparsify_auto, sparsify_blocks
from .config import MSTConfig
from .constants import UNCOUNTED, WHOLE_META
from .errors import MstCompileError
from .fields import is_int
from .passes.linear import opaque_weights
from .passes.pipeline import rewrite_graph
from .runtime.handle import MSTHandle
from .runtime.schedule import Schedule
from .runtime.sharding import refuse_sharded
from .runtime.sites import WeightSite


def as_config(config: MSTConfig | dict | None) -> MSTConfig:
    """``config`` as an ``MSTConfig``: None is the defaults, a dict goes through ``MSTConfig.from_dict``."""
    if config is None:
        return MSTConfig()
    if isinstance(config, MSTConfig):
        return config
    if isinstance(config, dict):
        return MSTConfig.from_dict(config)
    raise TypeError(f"config must be an MSTConfig, a dict or None, got {type(config).__name__}")


def sparsify(
    model: nn.Module,
    config: MSTConfig | dict | None = None,
    *,
    total_steps: int | None = None,
    seed: int = 0,
    example_inputs: Any = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    blocks: str | None = "auto",
) -> torch.fx.GraphModule:
    """Capture ``model`` and rewrite it for Mixed Sparsity Training.

    Returns a trainable module ``sm`` that shares parameters with ``model`` (training ``sm`` trains
    ``model`` in place) and carries the runtime handle ``sm.mst``. Every weight starts dense (the
    start of warm-up), so ``sm`` computes what ``model`` computes until sparsity is raised.

    ``total_steps``: the optimizer steps of the run, which the schedule spans (checked here, before
    anything is captured; needed to train: ``sm.mst.attach``); ``seed`` seeds the random growth. A module
    sparsified without ``total_steps`` can be inspected, measured and loaded into, not trained.

    ``example_inputs`` (a tensor, a tuple of positional args or a dict of keyword args) is needed
    only for models that ``torch.fx.symbolic_trace`` cannot trace, or whose weights sit inside modules
    it calls as a whole (``nn.MultiheadAttention``): given them, those are captured with
    ``torch.export``. ``filter_fn(module, fqn)`` returns False for modules whose weights must stay
    dense. ``sm.mst.skipped`` lists every weight matmul and attention site left dense, with why; the
    FLOP ledger charges them at dense cost on both sides.

    ``blocks``: with ``"auto"`` (the default) each child of the model's ``nn.ModuleList`` of blocks is
    captured as its own rewritten GraphModule in its place, so ``sm.transformer.h[i]`` is rewritten block
    i and can be wrapped per block (activation checkpointing, ``torch.compile``, FSDP2's ``fully_shard``:
    docs/design.md §4; where fx cannot capture a block, ``torch.export`` does, given ``example_inputs``); a
    model without such a list, or whose blocks neither captures, is captured whole (``sm.meta["mst_whole_why"]``
    says why). A dotted path (``"transformer.h"``) names the list and
    is refused rather than captured whole; ``None`` always captures one graph. The sites, masks and
    training are the same either way (docs/design.md §1, capture). Shard ``sm``, never ``model``: a
    sharded model is refused here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    refuse_sharded(model, "sparsify")  # before capture, whose failure on a sharded model would not say why
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:  # the density allocation counts the masks; a meta tensor has no values to count
        raise MstCompileError(f"sparsify: {meta!r} of {type(model).__name__} is on the meta device; materialize the model "
                              "first (model.to_empty(device=...) and its weight init), then sparsify and shard it")
    cfg = as_config(config)
    if not is_int(seed):
        raise ValueError(f"sparsify: seed={seed!r} is invalid: expected an integer")
    run = None if total_steps is None else Schedule(cfg, total_steps)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, fqn) -> bool, got {type(filter_fn).__name__}")
    pieces, whole_why = None, "blocks=None"
    if blocks == "auto":
        pieces, whole_why = sparsify_auto(model, stride=cfg.stride, filter_fn=filter_fn, example_inputs=example_inputs)
    elif blocks is not None:
        pieces = sparsify_blocks(model, blocks, stride=cfg.stride, filter_fn=filter_fn, example_inputs=example_inputs)
    if pieces is None:
        gm, how = capture(model, example_inputs)
        if how == "fx" and example_inputs is not None and opaque_weights(gm):
            gm, how = capture(model, example_inputs, fx=False)  # torch.export sees inside e.g. nn.MultiheadAttention
        lin, att = rewrite_graph(gm, stride=cfg.stride, filter_fn=filter_fn, modules=dict(model.named_modules()),
                                 example_inputs=gm.meta.get("example_inputs", example_inputs))
        gm.meta[WHOLE_META] = whole_why
    else:  # one GraphModule per block, called by the top-level graph (capture_blocks.py)
        gm, lin, att, how = pieces
    lin.warn_if_empty()
    hidden = [s for s in lin.skipped if UNCOUNTED in s[1]]
    if hidden:
        warnings.warn(f"sparsify: {len(hidden)} weights stay dense and uncounted: {hidden[0][0]} is {hidden[0][1]}",
                      stacklevel=2)
    attention = {s.name: s.module for s in att.sites}
    cfg.check_attention_sites(attention)
    skipped = lin.skipped + att.skipped
    sites = {s.name: WeightSite(s.name, gm.get_parameter(s.name), s.module, s.uses) for s in lin.sites}
    gm.mst = MSTHandle(gm, cfg, sites, attention, lin.other_uses, skipped, how, run, seed)
    return gm
