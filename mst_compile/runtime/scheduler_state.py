"""Checkpointing of the MST scheduler: everything needed to resume exactly, and the checks that a
checkpoint fits the model it is loaded into.

``state_dict`` holds the masks, the step, the random generator of growth, the exploration record,
the ledger and the attention sites pinned by hand, plus the config it ran under (a different config
on load is a warning, not an error: a resume may lengthen the run). Everything is on CPU and
``torch.save``-able with ``weights_only=True``.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError
from ..ops.tile_layout import is_tile_constant, not_tiled_message
from .sites import apply_masks, refresh

if TYPE_CHECKING:
    from .scheduler import MSTScheduler

FORMAT = "mst_compile.scheduler/1"



def state_dict(sch: MSTScheduler) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": sch.step,
        "masks": {n: s.mask.detach().cpu().clone() for n, s in sch.sites.items()},
        "ever_active": None if sch._ever is None else {n: m.cpu().clone() for n, m in sch._ever.items()},
        "generator": sch._generator.get_state(),
        "ledger": sch.ledger.state_dict(),
        "last_update": None if sch.last_update is None else dict(sch.last_update),
        "warned_past_end": sch._warned_past_end,
        "pinned_attention": dict(sch.pinned_attention),
        "config": _record(sch),
    }


@torch.no_grad()
def load_state_dict(sch: MSTScheduler, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"sm.mst.load_state_dict: expected a dict from sm.mst.state_dict() (format {FORMAT!r}), got {got!r}")
    _check_masks(sch, state["masks"])
    _warn_config(sch, state.get("config") or {})
    for name, site in sch.sites.items():
        site.sparse.set_mask(state["masks"][name].to(device=site.mask.device, dtype=torch.bool))
    refresh(sch.sites, sch.config.sparse_kernel)
    apply_masks(sch.sites)
    sch.step = int(state["step"])
    sch._generator.set_state(state["generator"])
    ever = state.get("ever_active")
    sch._ever = None if ever is None else {n: ever[n].to(s.mask.device).bool() for n, s in sch.sites.items()}
    sch.ledger.load_state_dict(state.get("ledger") or {})
    sch.last_update = state.get("last_update")
    sch._warned_past_end = bool(state.get("warned_past_end", False))
    pinned = state.get("pinned_attention") or {}
    sch.pinned_attention = {n: p for n, p in pinned.items() if n in sch.attention}
    if sch.attached:
        sch._reset_masked_state()
        sch._set_probes(sch._probes_for_next_step())
    sch._sync_attention(force=True)


def _check_masks(sch: MSTScheduler, masks: Any) -> None:
    if not isinstance(masks, dict):
        raise CheckpointError(f"sm.mst.load_state_dict: 'masks' must be a dict of name -> bool tensor, got {type(masks).__name__}")
    ours = {n: s.param for n, s in sch.sites.items()}
    missing = [n for n in ours if n not in masks]
    extra = [n for n in masks if n not in ours]
    if missing or extra:
        raise CheckpointError(
            f"sm.mst.load_state_dict: the checkpoint's masks do not fit this model: missing masks for {missing}, "
            f"masks for weights the model does not have: {extra}"
        )
    bad = []
    for n, p in ours.items():
        if not isinstance(masks[n], torch.Tensor) or tuple(masks[n].shape) != tuple(p.shape):
            shape = tuple(masks[n].shape) if isinstance(masks[n], torch.Tensor) else type(masks[n]).__name__
            bad.append(f"the mask of weight '{n}' has shape {shape} in the checkpoint, but the model's weight "
                       f"has shape {tuple(p.shape)}")
        elif sch.sites[n].sparse.tile is not None and not is_tile_constant(masks[n].bool(), sch.sites[n].sparse.tile):
            bad.append(not_tiled_message(n, masks[n], sch.sites[n].sparse.tile))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError("sm.mst.load_state_dict: " + "; ".join(bad[:3]) + more)


def _record(sch: MSTScheduler) -> dict[str, Any]:
    """The config a checkpoint was written under, with the run length it spanned."""
    run = {} if sch._run is None else {"total_steps": sch._run.total_steps}
    return {**sch.config.to_dict(), **run}


def _warn_config(sch: MSTScheduler, saved: dict[str, Any]) -> None:
    ours = _record(sch)
    diff = sorted(k for k in saved if k in ours and saved[k] != ours[k])
    if diff:
        warnings.warn(
            "sm.mst.load_state_dict: the checkpoint was written with a different MSTConfig ("
            + ", ".join(f"{k}: {saved[k]!r} -> {ours[k]!r}" for k in diff)
            + "); the schedule continues under the current config", stacklevel=4)
