"""``sm.mst``: the runtime handle of a sparsified module.

It owns the sparse state of every rewritten site: the site table (one ``WeightSite`` per sparse
weight: its mask, cached density and uses) and the attention sites, and the scheduler that evolves
them during training (``sm.mst.attach(optimizer)``, or ``attach(optimizer, manual=True)`` and
``sm.mst.step()``). The scheduler is given the table, the attention sites and the module
explicitly; it never reads this object. Nothing here imports ``passes``, so any training loop
(ours or a user's) can drive it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import MSTConfig
from ..errors import MstCompileError
from ..ops.attention import check_pattern, check_stride
from ..ops.sparse_linear import SparseWeight
from . import schedule as _schedule
from .ledger import FlopReport
from .scheduler import MSTScheduler
from .sites import Sites, WeightSite, allocation, apply_masks, keep_largest, overall_density, units


@dataclass(frozen=True)
class SiteInfo:
    """One rewritten site: ``kind`` is ``"linear"`` (one per sparse weight) or ``"attention"``."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    params: int = 0  # weights in the tensor (0 for attention)
    uses: int = 1  # graph nodes that use it (2 for a weight used twice)


class MSTHandle:
    """Masks, densities and attention patterns of one sparsified module."""

    def __init__(
        self,
        module: nn.Module,
        config: MSTConfig,
        sites: dict[str, WeightSite],
        attention: dict[str, nn.Module] | None = None,
        other_uses: Iterable[str] = (),
        skipped: list[tuple[str, str]] | None = None,
        capture: str = "fx",
        run: _schedule.Schedule | None = None,
        seed: int = 0,
    ):
        self._module = module  # the GraphModule this handle is sm.mst of
        self.config = config
        self.weight_sites: Sites = dict(sites)  # the site table, shared with the scheduler and its ledger
        self._attention = dict(attention or {})
        self.skipped = list(skipped or [])
        self.capture = capture
        self._hooks = [self._mask_grad_hook(n) for n in other_uses]
        looked_up = set(other_uses)  # a tied embedding: tiles would blank whole blocks of its rows (§9)
        for name, site in self.weight_sites.items():
            site.sparse.use_tiles(None if name in looked_up else config.tile)
        self._scheduler = MSTScheduler(config, self.weight_sites, self._attention, module, self.skipped, run, seed)

    # -- training: the scheduler --------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer | None, *, manual: bool = False,
               process_group=None) -> MSTHandle:
        """Hook ``optimizer`` so an ordinary training loop runs MST; returns this handle.

        After every ``optimizer.step()`` the step counter advances, masked weights are re-zeroed, the
        FLOP ledger charges the step, and every ``schedule.interval`` steps the Mixed-Growing topology
        update runs (docs/design.md §3-4). Under ``torch.distributed`` (``process_group`` defaults to the
        world) the dense gradients are averaged and every rank ends each update with identical masks.
        Under FSDP2 (``fully_shard`` on the rewritten blocks of a ``sparsify(..., blocks=...)`` module,
        then on ``sm``, then ``attach``) MST follows the DTensor parameters registered now and keeps
        each mask's local slice; a layout other than that is refused (docs/design.md §4, "Sharded").

        ``manual=True`` registers no hook: call :meth:`step` after every optimizer step the loop
        really took (loops under a loss scaler or ``accelerate`` that may skip one). ``optimizer``
        is still used to zero the optimizer state of dropped and regrown weights; ``None`` means the
        loop steps no ``torch.optim.Optimizer`` and resets its own state (manual mode).
        """
        self._scheduler.attach(optimizer, process_group, manual)
        return self

    def step(self) -> None:
        """Advance MST by one optimizer step (after ``attach(optimizer, manual=True)`` or ``attach(None)``).

        Does exactly what the optimizer hook of :meth:`attach` does: re-zero the masked weights,
        charge the step's FLOPs, and run the topology update when one is due. Call it once per
        optimizer step that really happened, after that step.
        """
        sch = self._scheduler
        if not sch.attached:
            raise MstCompileError("sm.mst.step(): MST is not attached; call sm.mst.attach(optimizer, manual=True) "
                                  "(or sm.mst.attach(None)) before training")
        if not sch.manual:
            raise MstCompileError(
                f"sm.mst.step(): MST already advances on every step of the attached {type(sch.optimizer).__name__}; "
                "calling step() too would count each step twice. Attach with manual=True to drive it by hand")
        sch.advance()

    def detach(self) -> None:
        """Remove the optimizer and forward hooks; masks, step and ledger are kept."""
        self._scheduler.detach()

    @property
    def step_count(self) -> int:
        """Optimizer steps taken since training started (restored by load_state_dict)."""
        return self._scheduler.step

    @property
    def schedule(self) -> _schedule.Schedule:
        """The config over the run's length (``sparsify(..., total_steps=T)``): ``.total_steps``, ``.interval``."""
        return self._scheduler.run

    @property
    def phase(self) -> str:
        """"warmup", "ultra" or "restoration" for the iteration about to run."""
        return self._scheduler.phase

    @property
    def target_sparsity(self) -> float:
        """The global sparsity the current masks were allocated for (changes at update steps)."""
        return self._scheduler.target_sparsity

    def lr_multiplier(self, min_ratio: float = 0.1, schedule: str = "wsd", decay: float | None = None) -> float:
        """The learning rate for the iteration about to run, as a fraction of the peak: the curve
        ``mstc train`` uses (``schedule`` "wsd": flat, then a cosine over restoration, or the last
        ``decay`` of the run; "cosine": over the whole run; add your own linear warm-up).
        Own loops: ``g["lr"] = peak * m``. Includes :meth:`lr_scale`."""
        curve = _schedule.lr_multiplier(self._scheduler.step, self.config, self.schedule.total_steps, min_ratio, schedule, decay)
        return curve * self.lr_scale()

    def lr_scale(self) -> float:
        """``(1/density)^config.lr_density_power`` at the current masks (1.0 when the power is 0, or when
        ``lr_density_scope="weight"``, which scales each sparse weight instead: :meth:`lr_scales`): the
        factor by which every parameter's learning rate exceeds the dense curve (docs/design.md §8)."""
        power = self.config.lr_density_power
        return 1.0 if power == 0 or self.config.lr_density_scope == "weight" else float(self.density()) ** -power

    def lr_scales(self) -> dict[str, float]:
        """Under ``lr_density_scope="weight"``: ``{weight name: (1/its density)^lr_density_power}``, the
        factor on top of :meth:`lr_multiplier` for each sparse weight (give each its own param group:
        ``g["lr"] = peak * m * scales.get(name, 1.0)``); other parameters keep ``m``. ``{}`` otherwise."""
        power = self.config.lr_density_power
        if power == 0 or self.config.lr_density_scope != "weight":
            return {}
        return {n: max(s.density, 1e-12) ** -power for n, s in self.weight_sites.items()}

    @property
    def flops(self) -> FlopReport:
        """MST and dense-baseline algorithmic training FLOPs so far (docs/design.md §6; not a timing)."""
        return self._scheduler.ledger.report

    @property
    def last_update(self) -> dict[str, Any] | None:
        """Exploration metrics of the latest topology update (None before the first)."""
        return self._scheduler.last_update

    def measure_flops(self, *args, **kwargs) -> tuple[float, float, int]:
        """(MST, dense, tokens) the ledger would charge one training forward ``sm(*args, **kwargs)``
        with the current masks and patterns; nothing is charged and no backward runs."""
        return self._scheduler.ledger.measure(self._module, lambda: self._module(*args, **kwargs))

    def footprint(self, *args, **kwargs):
        """What the ledger sees in one training forward ``sm(*args, **kwargs)`` (rows per sparse weight,
        attention calls, dense work), before densities and patterns apply: ``mst_compile.plan``'s input."""
        return self._scheduler.ledger.footprint(self._module, lambda: self._module(*args, **kwargs))

    def state_dict(self, whole: bool = False) -> dict[str, Any]:
        """Everything needed to resume MST exactly: masks, step, RNG state, ledger (torch.save-able).
        Under FSDP2 it is laid out for torch.distributed.checkpoint; ``whole=True`` gives the unsharded
        layout instead (whole masks gathered to every rank: a collective), for a consolidated checkpoint."""
        return self._scheduler.whole_state_dict() if whole else self._scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``CheckpointError`` when the masks do not fit the model."""
        self._scheduler.load_state_dict(state)

    # -- what was rewritten -------------------------------------------------------------------
    @property
    def sites(self) -> list[SiteInfo]:
        """Every rewritten site: one ``"linear"`` entry per sparse weight, then one per attention site."""
        lin = [SiteInfo(n, "linear", s.shape, s.param.numel(), s.uses) for n, s in self.weight_sites.items()]
        att = [SiteInfo(n, "attention", None) for n in self._attention]
        return lin + att

    def parameters(self) -> dict[str, nn.Parameter]:
        """The sparse parameters by name."""
        return {n: s.param for n, s in self.weight_sites.items()}

    def sparse_weights(self) -> dict[str, SparseWeight]:
        return {n: s.sparse for n, s in self.weight_sites.items()}

    def attention_modules(self) -> dict[str, nn.Module]:
        """Attention site name -> its ``HybridSparseAttention`` module."""
        return dict(self._attention)

    # -- masks and densities ------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """The mask of every sparse weight; under FSDP2 (after attach) a DTensor of this rank's slice,
        laid out like its weight (``.full_tensor()`` gathers it: a collective)."""
        return {n: s.mask if s.sparse.shard is None else s.sparse.as_dtensor(s.mask) for n, s in self.weight_sites.items()}

    def densities(self) -> dict[str, float]:
        return {n: s.active() / s.sparse.numel for n, s in self.weight_sites.items()}

    def density(self) -> float:
        """Overall density of the sparse weights (active / total)."""
        return overall_density(self.weight_sites)

    def allocation(self, sparsity: float) -> dict[str, int]:
        """Active count per weight for a global sparsity under the configured distribution (in tiles
        when ``config.tile`` is set; :meth:`units` are the totals they count against)."""
        return allocation(self.weight_sites, sparsity, self.config.distribution)

    def units(self) -> dict[str, int]:
        """Per weight, what :meth:`allocation` counts: its tiles (``config.tile``), else its weights."""
        return units(self.weight_sites)

    @torch.no_grad()
    def set_sparsity(self, sparsity: float) -> dict[str, float]:
        """Re-allocate densities for ``sparsity`` and keep each weight's largest-magnitude entries.

        Pruned weights are zeroed; the returned dict is the new density per weight.
        """
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"set_sparsity(sparsity={sparsity!r}): expected a number in [0, 1)")
        keep_largest(self.weight_sites, self.allocation(float(sparsity)), self.config.sparse_kernel)
        return self.densities()

    def apply_masks(self) -> None:
        """Zero every masked weight (the invariant the sparse op relies on)."""
        apply_masks(self.weight_sites)

    def _mask_grad_hook(self, name: str):
        """A parameter with uses outside the sparse op (tied embedding): mask its whole gradient, and
        on probe steps let its dense gradient include those uses (``SparseWeight.mask_gradient``)."""
        site = self.weight_sites[name]
        return site.param.register_hook(site.sparse.mask_gradient)

    # -- attention ----------------------------------------------------------------------------
    def set_attention(self, pattern: str | dict[str, str | None] | list[str | None] | None,
                      stride: int | None = None) -> None:
        """Switch attention patterns: one name for all sites, or a dict/list per site.

        A site set here keeps its pattern across the schedule's phase changes until it is set again;
        ``None`` (for all sites, or as a site's entry) hands it back to the schedule at once.
        ``stride`` (default: keep each site's) applies to the sites named.
        """
        names = list(self._attention)
        if pattern is None or isinstance(pattern, str):
            chosen = {n: pattern for n in names}
        elif isinstance(pattern, dict):
            unknown = sorted(set(pattern) - set(names))
            if unknown:
                raise ValueError(f"set_attention: unknown attention sites {unknown}; sites are {names}")
            chosen = dict(pattern)
        else:
            pattern = list(pattern)
            if len(pattern) != len(names):
                raise ValueError(f"set_attention: got {len(pattern)} patterns for {len(names)} attention sites")
            chosen = dict(zip(names, pattern))
        for n, p in chosen.items():  # check everything before changing anything
            if p is not None:
                check_pattern(p, f"set_attention: attention site '{n}'")
        check_stride(stride, "set_attention")
        pinned = self._scheduler.pinned_attention
        for n, p in chosen.items():
            if p is None:
                pinned.pop(n, None)
                p = self._scheduler.scheduled_attention(n)
            else:
                pinned[n] = p
            self._attention[n].set_pattern(p, stride=stride if stride is not None else self._attention[n].stride)

    def attention_patterns(self) -> dict[str, str]:
        return {n: m.pattern for n, m in self._attention.items()}

    def __getattr__(self, name: str):
        if name == "plan":  # renamed: mst_compile.plan is the cost forecast
            raise AttributeError("sm.mst.plan was renamed sm.mst.sites (the rewritten sites); "
                                 "mst_compile.plan(...) is the cost forecast of a run")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        lin = len(self.weight_sites)
        return f"MSTHandle({lin} sparse weights, {len(self._attention)} attention sites, density={self.density():.3f})"


def linear_flop_shares(sites: list[SiteInfo]) -> dict[str, float]:
    """Each linear site's share of the linear FLOPs per token (uses × n_in × n_out)."""
    work = {e.name: e.uses * math.prod(e.shape) for e in sites if e.kind == "linear"}
    total = sum(work.values()) or 1
    return {n: w / total for n, w in work.items()}

