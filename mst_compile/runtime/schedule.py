"""Sparsity variation and drop-fraction schedules (docs/design.md §3-4) as pure functions of
(step, ``Schedule``): a ``Schedule`` is an ``MSTConfig`` laid over a run of ``total_steps`` steps,
checked on construction (``sparsify`` builds it, before anything is captured).

Training of ``T = total_steps`` steps has three phases, with ``u`` the fraction of the current phase
elapsed:

- warm-up      [0, t1):  s(t) = s_max · (1 − (1 − u)³)          dense start, cubic ramp
- ultra        [t1, t2): s(t) = s_max
- restoration  [t2, T]:  s(t) = s_end + (s_max − s_end)·(1 − u³)  time mirror of the warm-up
  (``restoration_shape="late"``; ``"linear"``: 1 − u; ``"early"``: (1 − u)³, weights return first)

In restoration u runs from t2 to the last topology update k_last < T, not to T: masks change only at
updates, so a ramp that ended at T would leave the run at s(k_last) > s_end. With u = 1 at k_last the
last update lands ``final_sparsity`` and the steps after it train at that density.

``t1 = warmup_end·T`` and ``t2 = ultra_end·T`` rounded to whole steps. A ``config.schedule`` of
``(step, sparsity)`` points replaces s(t) by the piecewise linear curve through them (held flat
before the first and after the last point); the phases (attention switching, drop fractions) still
come from ``warmup_end`` and ``ultra_end``.

The drop fraction restarts a cosine in each phase k with its own ζ_k:
``ζ(t) = ζ_k/2 · (1 + cos(π·(t − τ_k)/(τ_{k+1} − τ_k)))``.

Topology updates run after optimizer steps ΔT, 2ΔT, ... < T, never after the last one; the sparsity
a run ends with is s(k_last), which the restoration ramp makes s_end.
Steps past ``T`` hold the state at ``T``. Nothing here touches a model or torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MSTConfig
from ..constants import DEFAULT_LR_DECAY, LR_SCHEDULES, PHASES
from ..fields import is_int


@dataclass(frozen=True)
class Schedule:
    """``config`` over a run of ``total_steps`` optimizer steps. Valid on construction: the run length
    is an integer > 0 and every phase that needs a topology update gets one (:func:`check`)."""

    config: MSTConfig
    total_steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.config, MSTConfig):
            raise TypeError(f"Schedule: config must be an MSTConfig, got {type(self.config).__name__}")
        if not is_int(self.total_steps) or self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps!r} is invalid: expected an integer > 0 (the run's optimizer steps)")
        check(self)

    @property
    def interval(self) -> int:
        """ΔT in steps: ``update_interval``, or from the run length so that the warm-up ramp gets at least
        five updates (``(t1 - 1) // 5``, at most 100; ``T // 30`` without a warm-up)."""
        if self.config.update_interval is not None:
            return self.config.update_interval
        t1 = int(self.config.warmup_end * self.total_steps + 0.5)
        return max(1, min(100, (t1 - 1) // 5 if t1 else self.total_steps // 30))


def _at(frac: float, total: int) -> int:
    """A fraction of total_steps rounded half up to a whole step."""
    return int(math.floor(frac * total + 0.5))


def phase_bounds(sched: Schedule) -> tuple[int, int, int]:
    """(t1, t2, T): the steps where ultra-sparsification and restoration begin, and the end."""
    T = sched.total_steps
    return _at(sched.config.warmup_end, T), _at(sched.config.ultra_end, T), T


def _step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid: expected an integer >= 0")
    return step


def _clip(step: int, sched: Schedule) -> int:
    return min(_step(step), sched.total_steps)


def phase_at(step: int, sched: Schedule) -> str:
    """"warmup", "ultra" or "restoration" at ``step`` (steps past total_steps stay in the last)."""
    t = _clip(step, sched)
    t1, t2, _ = phase_bounds(sched)
    if t < t1:
        return "warmup"
    if t < t2:
        return "ultra"
    return "restoration"


def _piecewise(t: int, points: list[tuple[int, float]]) -> float:
    if t <= points[0][0]:
        return points[0][1]
    for (a, sa), (b, sb) in zip(points, points[1:]):
        if t <= b:
            return sa + (sb - sa) * (t - a) / (b - a)
    return points[-1][1]


def target_sparsity(step: int, sched: Schedule) -> float:
    """The scheduled global sparsity s(t) of the sparse weights at ``step``."""
    t = _clip(step, sched)
    if sched.config.schedule is not None:
        return float(_piecewise(t, sched.config.schedule))
    t1, t2, T = phase_bounds(sched)
    s_max, s_end = float(sched.config.sparsity), float(sched.config.final_sparsity)
    if t < t1:
        u = t / t1
        return s_max * (1.0 - (1.0 - u) ** 3)
    end = restoration_end(sched)
    if t < t2 or end <= t2:  # an empty restoration phase (or one without an update) leaves s_max in place
        return s_max
    u = min(1.0, (t - t2) / (end - t2))
    remaining = {"late": 1.0 - u**3, "linear": 1.0 - u, "early": (1.0 - u) ** 3}[sched.config.ablation.restoration_shape]
    return s_end + (s_max - s_end) * remaining


def restoration_end(sched: Schedule) -> int:
    """The step where the restoration ramp reaches ``final_sparsity``: the last topology update (T without one)."""
    T = sched.total_steps
    return T - 1 - (T - 1) % sched.interval if T > sched.interval else T


def drop_fraction(step: int, sched: Schedule) -> float:
    """ζ(t): a cosine from ζ_k down to 0 over each phase k, restarted at every phase boundary."""
    t = _clip(step, sched)
    t1, t2, T = phase_bounds(sched)
    k = PHASES.index(phase_at(t, sched))
    start, end = ((0, t1), (t1, t2), (t2, T))[k]
    if end <= start:
        return 0.0
    zeta = sched.config.drop_fraction[k]
    return zeta / 2.0 * (1.0 + math.cos(math.pi * (t - start) / (end - start)))


def widening(step: int, sched: Schedule) -> float | None:
    """The stride scale of a site that leaves its sparse pattern at restoration, or None.

    With ``attention_restore="widen"``, a site whose restoration pattern would be dense instead keeps
    its ultra-phase pattern with the window and stride widened in three steps: the base stride l for
    restoration progress u < 0.25, 2l until 0.5, 4l until 0.75, then dense causal attention (8l = T
    for the default l = T/8). Few distinct patterns keep compiled graphs few. None: no widening now.
    """
    t = _clip(step, sched)
    if sched.config.ablation.attention_restore != "widen" or phase_at(t, sched) != "restoration":
        return None
    _, t2, T = phase_bounds(sched)
    u = (t - t2) / (T - t2)
    return 2.0 ** math.floor(4 * u) if u < 0.75 else None


def site_pattern(site: str, step: int, sched: Schedule, sites: list[str] | None = None) -> tuple[str, float]:
    """(pattern, stride scale) the schedule gives attention site ``site`` at ``step``: the config's
    pattern for the phase, or its ultra pattern widened while a widening restoration runs. ``sites``:
    the model's attention sites in order (``MSTConfig.attention_depth`` counts them)."""
    pattern = sched.config.attention_pattern(site, phase_at(step, sched), sites)
    scale = widening(step, sched)
    if pattern == "dense" and scale is not None:
        return sched.config.attention_pattern(site, "ultra", sites), scale
    return pattern, 1.0


def is_update_step(step: int, sched: Schedule) -> bool:
    """Topology updates run after optimizer steps k = ΔT, 2ΔT, ... strictly before total_steps.

    None runs after the last optimizer step T (docs/design.md §6): weights grown there would never train,
    and the final masks are the ones the last step trained.
    """
    return 0 < step < sched.total_steps and step % sched.interval == 0


def update_steps(sched: Schedule) -> list[int]:
    """Every step after which a topology update runs."""
    return list(range(sched.interval, sched.total_steps, sched.interval))


def last_update_at(step: int, sched: Schedule) -> int:
    """The latest update step <= ``step`` (0, the initial masks, before the first)."""
    t = min(_clip(step, sched), sched.total_steps - 1)
    return t - t % sched.interval


def check(sched: Schedule) -> None:
    """Raise on schedules that cannot run or that would silently skip what was asked (run by ``Schedule()``).

    Every phase longer than one step must contain a topology update: without one the warm-up ramp
    collapses into a one-shot prune and the ultra phase never evolves its topology.
    """
    T = sched.total_steps
    if sched.config.schedule is not None and sched.config.schedule[-1][0] > T:
        raise ValueError(
            f"MSTConfig.schedule has a point at step {sched.config.schedule[-1][0]}, past total_steps={T}: "
            "expected schedule steps in [0, total_steps]"
        )
    t1, t2, _ = phase_bounds(sched)
    if not 0 <= t1 <= t2 <= T:
        raise ValueError(
            f"MSTConfig phases do not fit: warmup_end={sched.config.warmup_end}, ultra_end={sched.config.ultra_end} give "
            f"t1={t1}, t2={t2} for total_steps={T}; expected 0 <= warmup_end <= ultra_end <= 1"
        )
    if sched.config.schedule is not None:
        return  # a user schedule sets the sparsity directly; phases only switch attention and ζ
    spans = {"warmup": (0, t1), "ultra": (t1, t2), "restoration": (t2, T)}
    updates = update_steps(sched)
    for name, (a, b) in spans.items():
        if b - a > 1 and not any(phase_at(k, sched) == name for k in updates):
            lost = {"warmup": "its sparsity ramp would be skipped and applied at once at the next update",
                    "ultra": "its topology would never evolve",
                    "restoration": "the density would never be restored (no update runs after the last optimizer step)"}[name]
            raise ValueError(
                f"MSTConfig.update_interval={sched.interval}: the {name} phase [{a}, {b}) of {T} steps contains no "
                f"topology update, so {lost}; expected update_interval <= {max(1, (b - a) // 5)} "
                "(or None to derive it from the run length)")


def lr_decay_start(config: MSTConfig, total_steps: int, decay: float | None = None) -> int:
    """The step where a WSD learning rate leaves its plateau: the last ``decay`` fraction of the run decays.

    ``decay=None`` decays over MST's restoration phase ``[t2, T]``; a config without one (``ultra_end=1``)
    decays over the last ``DEFAULT_LR_DECAY`` of the run instead of never decaying. Takes the config and
    the run length, not a ``Schedule``: a dense baseline follows the same curve without MST's checks.
    """
    T = total_steps
    t2 = _at(config.ultra_end, T)
    if decay is None:
        return t2 if t2 < T else _at(1.0 - DEFAULT_LR_DECAY, T)
    return _at(1.0 - decay, T)


def lr_multiplier(step: int, config: MSTConfig, total_steps: int, min_ratio: float = 0.1, schedule: str = "wsd",
                  decay: float | None = None, warmup: int = 0) -> float:
    """The learning rate at ``step`` as a fraction of the peak, after any linear warm-up (which the
    caller adds before ``warmup``), over a run of ``total_steps``:

    - ``"cosine"``: one cosine from 1 at ``warmup`` to ``min_ratio`` at the end of the run;
    - ``"wsd"``: warm-up/stable/decay: 1 until :func:`lr_decay_start`, then a cosine to ``min_ratio``
      over the rest, by default MST's restoration phase, so regrown weights train while the LR is still
      high and the final anneal happens at the restored density.

    The trainer uses this one curve for dense and sparse runs alike; ``sm.mst.lr_multiplier()`` gives
    it to own loops.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is invalid: expected one of {', '.join(LR_SCHEDULES)}")
    T = total_steps
    t = min(_step(step), T)
    if schedule == "wsd":
        start = lr_decay_start(config, T, decay)
        if t < start:
            return 1.0
    else:
        start = min(warmup, T - 1)
    u = min(1.0, max(0.0, (t - start) / max(1, T - start)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u))
