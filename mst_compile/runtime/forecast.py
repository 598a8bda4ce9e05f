"""The FLOP ledger's count of a whole run, computed before it runs (docs/design.md §6).

A run's charges follow from the schedule alone: iteration i (run while ``step_count == i``, charged
as step i + 1) uses the masks of the last update <= i, whose active counts are the allocation of
s(k) exactly; the dense-gradient probes of the weights that the update after step i + 1 grows by
gradient; and each attention site's pattern for step i. Given the ``Footprint`` of one forward
(what the ledger's hooks see), the per-step cost is ``Footprint.step_flops``, the ledger's own
formula; this module only walks the schedule. Steps whose state repeats are costed once.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..constants import PHASES
from ..ops.attention import effective_pattern
from . import schedule
from .ledger import Footprint
from .topology import probed


@dataclass
class PhaseCost:
    phase: str
    steps: int = 0
    mst_flops: float = 0.0
    dense_flops: float = 0.0
    linear_mst: float = 0.0
    attention_mst: float = 0.0
    first_step: int | None = None  # the first optimizer step (1-based) charged to this phase
    density_steps: float = 0.0  # the sparse weights' overall density, summed over the phase's steps

    @property
    def density(self) -> float:
        """The overall density of the sparse weights averaged over the phase's steps."""
        return self.density_steps / self.steps if self.steps else 1.0

    def as_dict(self) -> dict:
        return {"phase": self.phase, "steps": self.steps, "first_step": self.first_step, "mst_flops": self.mst_flops,
                "dense_flops": self.dense_flops, "linear_mst": self.linear_mst, "attention_mst": self.attention_mst,
                "density": self.density}


@dataclass
class Forecast:
    phases: list[PhaseCost] = field(default_factory=list)
    per_step: list[tuple[float, float]] | None = None  # (mst, dense) of every step, when asked for

    @property
    def mst_flops(self) -> float:
        return sum(p.mst_flops for p in self.phases)

    @property
    def dense_flops(self) -> float:
        return sum(p.dense_flops for p in self.phases)

    @property
    def reduction(self) -> float:
        return self.dense_flops / self.mst_flops if self.mst_flops else 1.0


def forecast(fp: Footprint, run: schedule.Schedule, allocation: Callable[[float], Mapping[str, int]],
             numel: Mapping[str, int], tokens_per_step: int, stride: int | None = None, keep_steps: bool = False,
             order: list[str] | None = None) -> Forecast:
    """The ledger's MST and dense totals, per phase, of ``run.total_steps`` optimizer steps of
    ``tokens_per_step`` tokens each. ``allocation(s)`` gives the active count per sparse weight at
    sparsity s (``sm.mst.allocation``), ``numel`` their sizes, ``stride`` the sites' stride (None: T/8),
    ``order`` the model's attention sites in order (``sm.mst.attention_modules()``; None: the order they
    ran in ``fp``'s forward), which ``MSTConfig.attention_depth`` counts."""
    T = run.total_steps
    scale = tokens_per_step / fp.tokens
    sites = list(dict.fromkeys(site for site, *_ in fp.attention))
    order = sites if order is None else list(order)
    lengths = sorted({t for _, _, t, _ in fp.attention})
    alloc_cache: dict[float, Mapping[str, int]] = {}

    def counts_at(step: int) -> Mapping[str, int]:
        s = schedule.target_sparsity(step, run)
        if s not in alloc_cache:
            alloc_cache[s] = allocation(s)
        return alloc_cache[s]

    phases = {p: PhaseCost(p) for p in PHASES}
    cost_cache: dict[tuple, tuple[float, float, float, float, float]] = {}
    size = {n: fp.linear[n][1] if n in fp.linear else numel[n] for n in numel}  # weights (units may be tiles)
    total = sum(size.values())
    sched_cache: dict[tuple, tuple] = {}
    counts, version = counts_at(0), 0  # the initial masks follow s(0)
    per_step = [] if keep_steps else None
    for i in range(T):
        if schedule.is_update_step(i, run):
            counts, version = counts_at(i), i
        probes: frozenset[str] = frozenset()
        if schedule.is_update_step(i + 1, run):
            probes = frozenset(probed(counts, counts_at(i + 1), schedule.drop_fraction(i + 1, run),
                                      run.config.grow_gradient_fraction))
        when = (schedule.phase_at(i, run), schedule.widening(i, run))  # all a site's pattern depends on
        scheduled = sched_cache.get(when)
        if scheduled is None:
            scheduled = sched_cache[when] = tuple(schedule.site_pattern(site, i, run, order) for site in sites)
        key = (version, probes, scheduled)
        if key not in cost_cache:
            density = {n: counts[n] / numel[n] for n in fp.linear}
            patterns = {(site, t): effective_pattern(pattern, stride, stride_scale, t)
                        for site, (pattern, stride_scale) in zip(sites, scheduled) for t in lengths}
            overall = sum(counts[n] / numel[n] * size[n] for n in numel) / total if total else 1.0  # sm.mst.density()
            cost_cache[key] = (*fp.step_flops(density, probes, patterns, scale), overall)
        mst, dense, lin, att, overall = cost_cache[key]
        ph = phases[schedule.phase_at(i, run)]
        if ph.first_step is None:
            ph.first_step = i + 1
        ph.steps += 1
        ph.mst_flops += mst
        ph.dense_flops += dense
        ph.linear_mst += lin
        ph.attention_mst += att
        ph.density_steps += overall
        if per_step is not None:
            per_step.append((mst, dense))
    return Forecast([phases[p] for p in PHASES if phases[p].steps], per_step)
