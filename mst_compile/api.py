"""The public verbs: ``sparsify`` a model into a trainable MST module."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .capture import capture
from .config import MSTConfig
from .fields import is_int
from .passes.attention import rewrite_attention
from .passes.dense import wrap_dense
from .passes.linear import opaque_weights, rewrite_linear
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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    refuse_sharded(model, "sparsify")  # before capture, whose failure on a sharded model would not say why
    cfg = as_config(config)
    if not is_int(seed):
        raise ValueError(f"sparsify: seed={seed!r} is invalid: expected an integer")
    run = None if total_steps is None else Schedule(cfg, total_steps)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, fqn) -> bool, got {type(filter_fn).__name__}")
    gm, how = capture(model, example_inputs)
    if how == "fx" and example_inputs is not None and opaque_weights(gm):
        gm, how = capture(model, example_inputs, fx=False)  # torch.export sees inside e.g. nn.MultiheadAttention
    lin = rewrite_linear(gm, filter_fn=filter_fn, modules=dict(model.named_modules()))
    lin.warn_if_empty()
    hidden = opaque_weights(gm)
    if hidden:
        warnings.warn(f"sparsify: {len(hidden)} weights stay dense and uncounted: {hidden[0][0]} is {hidden[0][1]}",
                      stacklevel=2)
    attention: dict[str, nn.Module] = {}
    skipped = list(lin.skipped)
    # attention pass: masks are evaluated on the inputs the graph was exported with (never size 1)
    att = rewrite_attention(gm, pattern="dense", stride=cfg.stride, example_inputs=gm.meta.get("example_inputs", example_inputs))
    attention.update({s.name: s.module for s in att.sites})
    cfg.check_attention_sites(attention)
    skipped.extend(att.skipped)
    wrap_dense(gm)  # what stays dense is charged dense on both sides of the ledger
    sites = {s.name: WeightSite(s.name, gm.get_parameter(s.name), s.module, s.uses) for s in lin.sites}
    gm.mst = MSTHandle(gm, cfg, sites, attention, lin.other_uses, skipped, how, run, seed)
    return gm
