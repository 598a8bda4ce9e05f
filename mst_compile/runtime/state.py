"""The scheduler's resumable state: ``sm.mst.state_dict()`` and ``sm.mst.load_state_dict()``.

A mixin of ``MSTScheduler`` (``scheduler.py``), kept apart so each file has one job: it reads and
restores the scheduler's attributes (site table, step, generator, exploration record, ledger,
pinned attention, config) and calls its ``_reset_masked_state``, ``_set_probes``,
``_probes_for_next_step``, ``_sync_attention`` and ``_count_ever``. Unsharded, the state is plain
CPU tensors and Python values (``torch.save``-able); under FSDP2 it is laid out for
``torch.distributed.checkpoint`` (docs/design.md §4, "Checkpoints").
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import CheckpointError
from . import sharding
from .sites import apply_masks, check_masks, refresh

STATE_FORMAT = "mst_compile.scheduler/1"  # the format of state_dict(); a checkpoint of another is refused


class ResumableState:
    """``state_dict`` / ``load_state_dict`` of ``MSTScheduler``."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the masks, the step, the random generator of growth, the
        exploration record, the ledger, the attention sites pinned by hand and the config it ran under.
        All on CPU and ``torch.save``-able with ``weights_only=True``. Under FSDP2 it is laid out for
        ``torch.distributed.checkpoint`` (:meth:`_for_dcp`)."""
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "masks": {n: self._saved(n, s.mask) for n, s in self.sites.items()},
            "ever_active": None if self._ever is None else {n: self._saved(n, m) for n, m in self._ever.items()},
            "generator": self._generator.get_state(),
            "ledger": self.ledger.state_dict(),
            "last_update": None if self.last_update is None else dict(self.last_update),
            "warned_past_end": self._warned_past_end,
            "pinned_attention": dict(self.pinned_attention),
            "config": self._record(),
        }
        return self._for_dcp(state) if self._sharded else state

    def _for_dcp(self, state: dict[str, Any]) -> dict[str, Any]:
        """The FSDP2 layout. DCP writes each rank's slices of a DTensor, flattens nested dicts into keys
        and loads into a template (a fresh run's state dict), so every key must exist from step 0 on:
        the masks and the exploration record are DTensors laid out like their weights (the record all
        False until it starts, ``ever_started`` saying which), and the dicts whose keys vary
        (last update, pinned attention, ledger, config) are lists of pairs, which DCP keeps whole."""
        if state["ever_active"] is None:
            state["ever_active"] = {n: self._saved(n, torch.zeros_like(s.mask)) for n, s in self.sites.items()}
        state["ever_started"] = self._ever is not None
        for key in ("last_update", "pinned_attention", "ledger", "config"):
            state[key] = list((state[key] or {}).items())
        return state

    def whole_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` in the unsharded layout (whole masks on CPU, plain dicts), also under FSDP2,
        where it is a collective: every rank gathers each mask in turn and gets the same dict. What a
        consolidated checkpoint holds: ``load_state_dict`` takes it on any number of ranks, sharded or not."""
        if not self._sharded:
            return self.state_dict()
        state = self.state_dict()
        started = state.pop("ever_started")
        state["masks"] = {n: self._whole(m, n).cpu() for n, m in state["masks"].items()}
        state["ever_active"] = {n: self._whole(m, n).cpu() for n, m in state["ever_active"].items()} if started else None
        for key in ("last_update", "pinned_attention", "ledger", "config"):
            state[key] = dict(state[key])
        state["last_update"] = state["last_update"] if self.last_update is not None else None
        return state

    def _saved(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """A copy of a mask (or record) for the state dict: on CPU, or the DTensor of its slices."""
        if self._sharded:
            return self.sites[name].sparse.as_dtensor(mask.detach().clone())
        return mask.detach().cpu().clone()

    def _whole(self, mask: torch.Tensor, name: str) -> torch.Tensor:
        """A checkpoint's mask as the whole bool tensor on the weight's device (a DTensor is gathered)."""
        if sharding.is_dtensor(mask):
            mask = mask.to(torch.uint8).full_tensor()  # gloo gathers no bool tensors
        return mask.to(device=self.sites[name].mask.device, dtype=torch.bool)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, checking first that its masks fit this model. A different config is
        a warning, not an error: a resume may lengthen the run. Under FSDP2 (a collective) the masks may be
        DTensors of any layout or whole tensors; each is gathered in turn and this rank keeps its slice."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"sm.mst.load_state_dict: expected a dict from sm.mst.state_dict() (format {STATE_FORMAT!r}), got {got!r}")
        check_masks(self.sites, state["masks"])
        self._warn_config(dict(state.get("config") or {}))  # a dict, or pairs (the FSDP2 layout)
        for name, site in self.sites.items():
            site.sparse.set_mask(self._whole(state["masks"][name], name))
        refresh(self.sites, self.config.sparse_kernel)
        apply_masks(self.sites)
        self.step = int(state["step"])
        self._generator.set_state(state["generator"])
        ever = state.get("ever_active") if state.get("ever_started", True) else None
        self._ever = None if ever is None else {n: self._whole(ever[n], n) for n in self.sites}
        if self._sharded and self._ever is not None:
            self._ever = {n: self.sites[n].sparse.slice_of(m) for n, m in self._ever.items()}
        self._count_ever()
        self.ledger.load_state_dict(dict(state.get("ledger") or {}))
        self.last_update = dict(state["last_update"]) if state.get("last_update") else None
        self._warned_past_end = bool(state.get("warned_past_end", False))
        pinned = dict(state.get("pinned_attention") or {})
        self.pinned_attention = {n: p for n, p in pinned.items() if n in self.attention}
        if self.attached:
            self._reset_masked_state()
            self._set_probes(self._probes_for_next_step())
        self._sync_attention(force=True)

    def _record(self) -> dict[str, Any]:
        """The config a checkpoint was written under, with the run length it spanned."""
        run = {} if self._run is None else {"total_steps": self._run.total_steps}
        return {**self.config.to_dict(), **run}

    def _warn_config(self, saved: dict[str, Any]) -> None:
        ours = self._record()
        if isinstance(saved.get("drop_fraction"), (int, float)):  # written before ζ was per phase only: ζ meant (ζ, ζ, 0)
            z = float(saved["drop_fraction"])
            saved = {**saved, "drop_fraction": list(saved.get("drop_fractions") or (z, z, 0.0))}
        diff = sorted(k for k in saved if k in ours and saved[k] != ours[k])
        if diff:
            warnings.warn(
                "sm.mst.load_state_dict: the checkpoint was written with a different MSTConfig ("
                + ", ".join(f"{k}: {saved[k]!r} -> {ours[k]!r}" for k in diff)
                + "); the schedule continues under the current config",
                stacklevel=5)  # the caller of sm.mst.load_state_dict (handle, no_grad wrapper, load_state_dict, here)
