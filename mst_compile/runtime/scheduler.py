"""The MST scheduler: drives sparsity variation, Mixed-Growing updates and HSA switching from an
ordinary training loop.

``sm.mst.attach(optimizer)`` registers an optimizer step post-hook; after that the user's loop
(``loss.backward(); opt.step(); opt.zero_grad()``) runs MST unchanged. After optimizer step k
(``sm.mst.step_count`` becomes k):

1. masked weights are re-zeroed (any optimizer, weight decay included, keeps the op's invariant);
2. the FLOP ledger charges the work counted since step k−1;
3. if k is a multiple of ΔT and k < T (``sparsify(..., total_steps=T)``), the topology update runs with the target s(k), the
   drop fraction ζ(k) and the dense gradient that the backward of step k formed (DDP: averaged
   across ranks first; rank 0's masks are then broadcast so every rank holds identical bits);
4. if k+1 is an update step, the sparse ops of the weights that update will grow by gradient are
   asked to form the dense gradient on the next backward (gradient accumulation sums into it like
   any gradient); a weight with nothing to grow there (drop fraction 0 and no density increase, or
   SET growth) takes no such probe step and the ledger charges none;
5. each attention site runs ``config.attention_pattern(site, phase)`` (``config.attention`` in
   ``config.attention_phases``, dense causal elsewhere, unless ``config.attention_sites`` says
   otherwise); a site given a pattern by ``sm.mst.set_attention`` keeps it across phase changes
   until ``set_attention`` changes it again (``None`` hands it back to the schedule).
6. with ``attention_restore="widen"``, a site that turns dense at restoration keeps its ultra
   pattern with a widening window instead (``schedule.widening``), then turns dense.

So iteration t (run while ``sm.mst.step_count == t``) uses phase ``phase_at(t)`` and the masks of the last
update <= t. The optimizer step of an update step is never skipped. Under ``GradScaler`` a skipped
step (inf/NaN) is not counted (fused optimizers included, which run the step and skip inside), and a dense
gradient that is not finite is replaced by random growth.
``attach(optimizer, manual=True)`` (or ``attach(None)``) registers no hook: the loop calls
``sm.mst.step()`` after each optimizer step it really took, and the same sequence runs.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import MSTConfig
from ..errors import MstCompileError
from . import fsdp, schedule, sharding
from .ledger import FlopLedger, excluded_ops
from .sites import Sites, allocation, apply_masks, keep_largest, overall_density, refresh
from .state import ResumableState
from .topology import apply_change, mixed_growing, probed, zero_state


class MSTScheduler(ResumableState):
    """Step counter, topology updates, attention switching, FLOP ledger and resumable state (``state.py``).

    Works on what the handle passes in: the site table (shared, so a mask change here is the
    handle's too), the attention sites, the module to hook and the sites the passes skipped."""

    def __init__(self, config: MSTConfig, sites: Sites, attention: dict[str, nn.Module], module: nn.Module,
                 skipped: list[tuple[str, str]], run: schedule.Schedule | None = None, seed: int = 0):
        self.config = config
        self._run = run  # the config over the run's length; None: not given to sparsify (no training)
        self.sites = sites  # the handle's site table (the same dict: mask changes are seen by both)
        self.attention = attention  # site name -> HybridSparseAttention
        self.module = module  # the sparsified GraphModule: forward hooks go on it
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.attached = False
        self.manual = False  # True: the loop calls sm.mst.step() itself (no optimizer hook)
        self.last_update: dict[str, Any] | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._ever: dict[str, torch.Tensor] | None = None  # weights active in any sparse topology so far
        self._warned_past_end = False
        self._probing: set[str] = set()  # weights whose next backward forms the dense gradient
        self._phase_applied: tuple | None = None  # (phase, widening) last applied
        self.pinned_attention: dict[str, str] = {}  # site -> pattern set by hand, kept across phases
        self._group = None
        self._sharded = False  # FSDP2: the sites hold DTensor parameters and the local slices of their masks
        self._ever_count = 0  # sharded: active-ever entries over all ranks (the record holds local slices)
        self._hooks: list = []
        self._slots = sharding.slots(module, {n: s.param for n, s in sites.items()})  # where the module registers each weight
        linear = {n: (s.param.numel(), s.sparse) for n, s in sites.items()}
        self.ledger = FlopLedger(linear, attention, lambda n: sites[n].density, excluded_ops(skipped))

    # -- where the run is ---------------------------------------------------------------------
    @property
    def run(self) -> schedule.Schedule:
        """The config over the run's length, which ``sparsify(..., total_steps=T)`` was given."""
        if self._run is None:
            raise MstCompileError("sm.mst: the run length is unknown, so there is no schedule to train by; pass it to "
                                  "sparsify(model, config, total_steps=T)")
        return self._run

    @property
    def phase(self) -> str:
        return schedule.phase_at(self.step, self.run)

    @property
    def last_update_step(self) -> int:
        """The latest step <= now at which a topology update ran (0 before the first)."""
        return schedule.last_update_at(self.step, self.run)

    @property
    def target_sparsity(self) -> float:
        """The sparsity the current masks were allocated for (it only changes at update steps)."""
        return schedule.target_sparsity(self.last_update_step, self.run)

    # -- attaching ----------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer | None, process_group=None, manual: bool = False) -> None:
        if self.attached:
            raise MstCompileError(
                "sm.mst.attach: already attached "
                f"({type(self.optimizer).__name__ if self.optimizer is not None else 'no optimizer'}); "
                "call sm.mst.detach() first to switch optimizers"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"sm.mst.attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}; for an optimizer "
                "of another kind attach None and call sm.mst.step() after each of its steps")
        _ = self.run  # the schedule must be known before anything is hooked
        hooks = self._follow_shards()  # before the optimizer check, which would blame the optimizer
        try:
            self._check_optimizer(optimizer)
        except Exception:
            for h in hooks:
                h.remove()
            raise
        self._hooks.extend(hooks)
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = fsdp.group_of(self.sites) if self._sharded else dist.group.WORLD
        self._group = process_group if process_group is not None and dist.get_world_size(process_group) > 1 else None
        self.optimizer, self.manual, self.attached = optimizer, manual or optimizer is None, True
        if self.step == 0:
            self._initial_masks()
        if not self.manual:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        self._hooks.append(self.module.register_forward_pre_hook(self._drop_stale_probes))
        self.ledger.install(self.module)
        apply_masks(self.sites)
        self._reset_masked_state()
        self._set_probes(self._probes_for_next_step())
        self._sync_attention(force=True)

    def _follow_shards(self) -> list:
        """Accept the layout (unsharded or FSDP2 as documented, else refuse in one line); under FSDP2
        re-bind the site table to the DTensor parameters sm registers now (``runtime/fsdp.py``)."""
        self._sharded = sharding.fsdp2_layout(self.module, "sm.mst.attach")
        hooks = []
        if self._sharded:
            if self.config.tile is not None:
                raise MstCompileError(f"sm.mst.attach: tile-structured masks (MSTConfig.tile={self.config.tile}) are not "
                                      "supported under FSDP2 yet; use tile=None, or DDP")
            hooks = fsdp.follow(self.module, self.sites)
            self._slots = sharding.slots(self.module, {n: s.param for n, s in self.sites.items()})
        sharding.check_slots(self.module, self._slots, "sm.mst.attach")
        return hooks

    def _check_optimizer(self, optimizer) -> None:
        refresh(self.sites, self.config.sparse_kernel)  # each weight's kernel for its device now (a kernel that cannot run fails here)
        held = set() if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, s in self.sites.items() if id(s.param) not in held]
        if optimizer is not None and missing:
            shard = " (under FSDP2: build it after fully_shard(sm), from sm.parameters())" if self._sharded else ""
            raise ValueError(
                f"sm.mst.attach: the {type(optimizer).__name__} does not hold the sparse weights {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}; build it from sm.parameters() (or the model's parameters){shard}"
            )

    def detach(self) -> None:
        """Remove every hook; the masks, step and ledger stay as they are."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.ledger.remove()
        self._set_probes(set())
        self.optimizer, self.attached, self.manual = None, False, False

    @torch.no_grad()
    def _initial_masks(self) -> None:
        """At step 0 the masks follow s(0): dense for the default schedule, sparse for one that starts sparse."""
        counts = self._allocation(schedule.target_sparsity(0, self.run))
        if any(s.active_units() != counts[n] for n, s in self.sites.items()):
            keep_largest(self.sites, counts, self.config.sparse_kernel)

    # -- the hook -----------------------------------------------------------------------------
    def _after_step(self, optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # GradScaler with a fused optimizer: the step ran
        if isinstance(found_inf, torch.Tensor) and bool(found_inf):  # but skipped its update inside the kernel
            return
        self.advance()

    def advance(self) -> None:
        """One optimizer step was taken: re-mask, charge it, update the topology when it is due."""
        sharding.check_slots(self.module, self._slots, f"MST step {self.step + 1}")  # sharded since attach: masks would miss
        self.step += 1
        apply_masks(self.sites)
        self.ledger.close_step()
        T = self.run.total_steps
        if self.step > T:
            if not self._warned_past_end:
                self._warned_past_end = True
                warnings.warn(
                    f"MST stepped past total_steps={T} (step {self.step}): holding the final masks and attention "
                    "patterns; pass a larger total_steps to sparsify to keep the schedule going", stacklevel=3)
            self._set_probes(set())
            return
        if schedule.is_update_step(self.step, self.run):
            self._update()
        self._set_probes(self._probes_for_next_step())
        self._sync_attention()

    def _probes_for_next_step(self) -> set[str]:
        """The weights whose update after the next step grows some positions by gradient.

        The counts follow from the current masks and the schedule alone (docs/design.md §4), so every DDP
        rank picks the same set; weights with nothing to grow by gradient need no dense gradient."""
        k, run = self.step + 1, self.run
        if not schedule.is_update_step(k, run) or self.config.grow_gradient_fraction == 0:
            return set()
        active = {name: site.active_units() for name, site in self.sites.items()}
        return probed(active, self._allocation(schedule.target_sparsity(k, run)), schedule.drop_fraction(k, run),
                      self.config.grow_gradient_fraction)

    def _allocation(self, sparsity: float) -> dict[str, int]:
        return allocation(self.sites, sparsity, self.config.distribution)

    def _set_probes(self, names: set[str]) -> None:
        for n in names | self._probing:
            self.sites[n].sparse.collect_dense_grad(n in names)  # a fresh zero probe each time: no gradient carries over
        self._probing = set(names)

    def _drop_stale_probes(self, module, args) -> None:
        """A probe that holds a gradient while the weights' gradients were cleared is left over from
        a step the optimizer never took (GradScaler skips steps with inf/NaN): start it afresh."""
        if not self._probing or not torch.is_grad_enabled():
            return
        first = next(iter(self.sites.values()), None)
        if first is not None and first.param.grad is None:
            if any(self.sites[n].sparse.holds_dense_grad() for n in self._probing):
                self._set_probes(self._probing)

    def scheduled_attention(self, site: str) -> str:
        """The pattern ``site`` runs now: its pinned one, else the config's for the current phase (its
        ultra pattern while a widening restoration has not yet turned it dense)."""
        return self._scheduled(site)[0]

    def _scheduled(self, site: str) -> tuple[str, float]:
        """(pattern, stride scale) of ``site`` now."""
        if site in self.pinned_attention:
            return self.pinned_attention[site], 1.0
        return schedule.site_pattern(site, self.step, self.run, list(self.attention))

    def _sync_attention(self, force: bool = False) -> None:
        if not self.attention:
            return
        now = (self.phase, schedule.widening(self.step, self.run))
        if force or now != self._phase_applied:
            for name, site in self.attention.items():
                pattern, site.stride_scale = self._scheduled(name)
                site.set_pattern(pattern)
            self._phase_applied = now

    # -- the topology update ------------------------------------------------------------------
    @torch.no_grad()
    def _dense_grads(self) -> dict[str, torch.Tensor | None]:
        grads = {n: s.sparse.dense_grad() for n, s in self.sites.items()}
        if self._group is None:
            return grads
        world = dist.get_world_size(self._group)
        out = dict.fromkeys(grads)
        for n in sorted(self._probing):  # the probe is no DDP parameter: average it here (same set on every rank)
            g, p = grads[n], self.sites[n].param
            g = torch.zeros(p.shape, device=p.device) if g is None else g.detach().float().clone()
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self._group)
            out[n] = g.div_(world)
        return out

    @torch.no_grad()
    def _update(self) -> None:
        t, cfg = self.step, self.config
        sparsity = schedule.target_sparsity(t, self.run)
        zeta = schedule.drop_fraction(t, self.run)
        counts = self._allocation(sparsity)
        init = cfg.ablation.grow_init_scale > 0
        if self._sharded:  # one whole tensor at a time, every rank alike (runtime/fsdp.py)
            planned = {name: fsdp.plan(site, counts[name], zeta, cfg.grow_gradient_fraction, self._generator,
                                       name in self._probing, init) for name, site in self.sites.items()}
            changes = {name: sc.change for name, sc in planned.items()}
        else:
            grads = self._dense_grads()
            changes = {}
            for name, site in self.sites.items():
                changes[name] = mixed_growing(site.param, site.mask, grads[name], counts[name], zeta,
                                              cfg.grow_gradient_fraction, self._generator, site.sparse.tile)
            if self._group is not None:
                self._agree_on_masks(changes)
        totals = dict(pruned=0, grown_gradient=0, grown_random=0, regrown=0)
        fallback = False
        for name, site in self.sites.items():
            ch, param = changes[name], site.param
            if self._sharded:
                site.sparse.set_local_mask(ch.mask.view_as(site.mask), planned[name].active)
            else:
                site.sparse.set_mask(ch.mask.view_as(param))
            apply_change(param, ch, self.optimizer)
            if init and self._sharded:
                fsdp.init_grown(param, planned[name], cfg.ablation.grow_init_scale, self._generator)
            elif init:
                self._init_grown(param, ch)
            totals["pruned"] += ch.n_prune
            totals["grown_gradient"] += ch.n_grow_gradient
            totals["grown_random"] += ch.n_grow_random
            totals["regrown"] += ch.regrown
            fallback |= ch.gradient_fallback
        refresh(self.sites, cfg.sparse_kernel)
        self._track_exploration()
        self.last_update = {
            "step": t,
            "phase": schedule.phase_at(t, self.run),
            "target_sparsity": sparsity,
            "drop_fraction": zeta,
            **totals,
            "active": sum(counts.values()),
            "ever_active": self.ever_active(),
            "gradient_fallback": fallback,
        }

    def _init_grown(self, param: torch.Tensor, ch) -> None:
        """Grown weights start at N(0, σ²), σ = grow_init_scale · rms of the weights that stayed active
        (drawn from the CPU generator every rank holds alike, so DDP ranks stay identical)."""
        grown = ch.grown.view_as(param)
        n = int(grown.sum())
        kept = ch.mask.view_as(param) & ~grown
        if n == 0 or not bool(kept.any()):
            return
        sigma = self.config.ablation.grow_init_scale * float(param[kept].float().pow(2).mean().sqrt())
        noise = torch.randn(n, generator=self._generator, device="cpu").to(device=param.device, dtype=param.dtype)
        param[grown] = noise * sigma

    def _agree_on_masks(self, changes) -> None:
        """Broadcast rank 0's masks so floating-point differences can never split the ranks."""
        names = list(changes)
        flat = torch.cat([changes[n].mask.to(torch.uint8) for n in names])  # (Σ N_l,)
        dist.broadcast(flat, src=dist.get_global_rank(self._group, 0), group=self._group)
        for n, part in zip(names, torch.split(flat, [changes[n].mask.numel() for n in names])):
            ch = changes[n]
            old = ch.mask & ~ch.grown | ch.dropped  # the mask before the update
            ch.mask = part.bool()
            ch.dropped, ch.grown = old & ~ch.mask, ch.mask & ~old

    def _track_exploration(self) -> None:
        masks = {n: s.mask for n, s in self.sites.items()}
        if self._ever is None:
            if overall_density(self.sites) >= 1.0:
                return  # still dense: exploration starts once the topology is sparse
            self._ever = {n: m.detach().clone() for n, m in masks.items()}
        else:
            for n, m in masks.items():
                self._ever[n] |= m
        self._count_ever()

    def _count_ever(self) -> None:
        """Sharded: count the record over every rank now (a collective), so ever_active() needs none."""
        if self._sharded and self._ever is not None:
            self._ever_count = fsdp.active_total(list(self._ever.values()), fsdp.group_of(self.sites))

    def ever_active(self) -> float:
        """Share of the sparse weights that have been active in at least one sparse topology so far."""
        if self._ever is None:
            density = overall_density(self.sites)
            return 1.0 if density >= 1.0 else density
        total = sum(s.sparse.numel for s in self.sites.values())
        count = self._ever_count if self._sharded else sum(int(m.sum()) for m in self._ever.values())
        return count / total if total else 1.0

    @torch.no_grad()
    def _reset_masked_state(self) -> None:
        """Zero optimizer state wherever a mask is 0 (a moment left there would revive a dead weight)."""
        for site in self.sites.values():
            zero_state(self.optimizer, site.param, ~site.mask)
