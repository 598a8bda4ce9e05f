"""MSTConfig: every knob of Mixed Sparsity Training (docs/design.md §2-5), validated on construction.

Importing this module does not import torch, so the CLI can build and check configs cheaply.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .constants import (
    ATTENTION_PATTERNS,
    ATTENTION_RESTORES,
    DISTRIBUTIONS,
    PHASES,
    RESTORATION_SHAPES,
    SPARSE_KERNELS,
    TILE_KERNELS,
    TILES,
)

__all__ = ["MSTConfig", "PRESETS", "ATTENTION_PATTERNS", "ATTENTION_RESTORES", "DISTRIBUTIONS", "PHASES",
           "RESTORATION_SHAPES", "SPARSE_KERNELS"]


def _set(cfg: MSTConfig, name: str, value: Any) -> None:
    """Store the normalised form of a field during validation (the dataclass is frozen)."""
    object.__setattr__(cfg, name, value)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MSTConfig.{name}={value!r} is invalid: expected {allowed}")


@dataclass(frozen=True)
class MSTConfig:
    """Configuration of one MST run. Frozen: every field is validated once, here, so a config that
    exists is valid; change one with ``cfg.replace(sparsity=0.9)`` (validated again).

    Sparsity variation (docs/design.md §3): dense start, cubic ramp to ``sparsity`` over
    ``[0, warmup_end*T)``, constant ``sparsity`` until ``ultra_end*T``, then restoration down to
    ``final_sparsity`` at ``T = total_steps``. ``schedule`` replaces all of that with any piecewise
    linear list of ``(step, sparsity)`` points.

    Attention (docs/design.md §5): every site runs ``attention`` in ``attention_phases`` and dense causal
    elsewhere, unless a rule of ``attention_sites`` matches it. That dict maps a site name or an
    ``fnmatch`` glob (``"h.*.attn"``; ``*`` also crosses dots) to either one pattern, used in
    ``attention_phases`` with dense elsewhere, or a ``{phase: pattern}`` dict that sets only the
    phases it names. Rules apply in order and a later match overrides an earlier one, e.g.
    ``{"h.*.attn": "local", "h.0.attn": "dense"}`` keeps the first layer dense. See
    :meth:`attention_pattern`.
    """

    total_steps: int = 1000
    sparsity: float = 0.85  # s_max, held during ultra-sparsification
    final_sparsity: float = 0.5  # s_end, reached at the end of restoration
    warmup_end: float = 0.1  # t1 / T
    ultra_end: float = 0.8  # t2 / T
    schedule: list[tuple[int, float]] | None = None  # overrides the three phases when given
    distribution: str = "er"
    update_interval: int | None = None  # ΔT between topology updates; None: from the run length (interval)
    drop_fraction: float = 0.3  # ζ of warm-up and ultra (restoration drops nothing) unless drop_fractions is given
    drop_fractions: tuple[float, float, float] | None = None  # ζ per phase; None: (drop_fraction, drop_fraction, 0)
    grow_gradient_fraction: float = 0.75  # 0.75 = Mixed-Growing 3:1, 1.0 = RigL, 0.0 = SET
    attention: str = "sparse"  # pattern used in attention_phases; dense causal elsewhere
    stride: int | None = None  # HSA stride l; None means T/8 of the running sequence length
    attention_phases: tuple[str, ...] = ("warmup", "ultra", "restoration")
    sparse_kernel: str = "auto"  # linear kernel: auto picks CSR (or, with tiles, the tile kernel) below the measured crossover
    tile: int | None = None  # masks constant on tile x tile blocks of each weight (docs/design.md §9); None: unstructured
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the run
    # how the phases end (see the class docstring); the paper's recipe is preset("paper")
    grow_init_scale: float = 0.0  # grown weights start at N(0, (scale·rms of the layer's active weights)²)
    attention_restore: str = "switch"  # leaving attention_phases: dense at once, or a widening window
    restoration_shape: str = "late"  # when restored weights come back: late (1 − u³), linear, early ((1 − u)³)
    attention_sites: dict[str, str | dict[str, str]] | None = None  # per-site pattern rules (see above)

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps <= 0:
            _fail("total_steps", self.total_steps, "an integer > 0")
        for name in ("sparsity", "final_sparsity"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
                _fail(name, v, "a number in [0, 1)")
        for name in ("warmup_end", "ultra_end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                _fail(name, v, "a fraction of total_steps in [0, 1]")
        if self.warmup_end > self.ultra_end:
            _fail("ultra_end", self.ultra_end, f"a fraction >= warmup_end ({self.warmup_end})")
        if self.schedule is not None:
            pts = [tuple(p) for p in self.schedule]
            if not pts or any(len(p) != 2 for p in pts):
                _fail("schedule", self.schedule, "a non-empty list of (step, sparsity) pairs")
            steps = [p[0] for p in pts]
            if any(int(s) != s or s < 0 for s in steps) or steps != sorted(set(steps)):
                _fail("schedule", self.schedule, "steps that are integers >= 0 in strictly increasing order")
            if any(not 0.0 <= p[1] < 1.0 for p in pts):
                _fail("schedule", self.schedule, "sparsities in [0, 1)")
            _set(self, "schedule", [(int(s), float(v)) for s, v in pts])
        if self.distribution not in DISTRIBUTIONS:
            _fail("distribution", self.distribution, f"one of {', '.join(DISTRIBUTIONS)}")
        if self.update_interval is not None and (isinstance(self.update_interval, bool)
                                                 or not isinstance(self.update_interval, int) or self.update_interval < 1):
            _fail("update_interval", self.update_interval, "None (from the run length) or an integer >= 1")
        if not isinstance(self.drop_fraction, (int, float)) or not 0.0 <= self.drop_fraction <= 1.0:
            _fail("drop_fraction", self.drop_fraction, "a number in [0, 1]")
        if self.drop_fractions is not None:
            dfs = tuple(self.drop_fractions)
            if len(dfs) != 3 or any(not isinstance(z, (int, float)) or not 0.0 <= z <= 1.0 for z in dfs):
                _fail("drop_fractions", self.drop_fractions, "three numbers in [0, 1] (warmup, ultra, restoration)")
            _set(self, "drop_fractions", tuple(float(z) for z in dfs))
        if not isinstance(self.grow_gradient_fraction, (int, float)) or not 0.0 <= self.grow_gradient_fraction <= 1.0:
            _fail("grow_gradient_fraction", self.grow_gradient_fraction, "a number in [0, 1]")
        if self.attention not in ATTENTION_PATTERNS:
            _fail("attention", self.attention, f"one of {', '.join(ATTENTION_PATTERNS)}")
        if self.stride is not None and (isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1):
            _fail("stride", self.stride, "None (T/8) or an integer >= 1")
        phases = tuple(self.attention_phases)
        if any(p not in PHASES for p in phases):
            _fail("attention_phases", self.attention_phases, f"phase names from {', '.join(PHASES)}")
        _set(self, "attention_phases", phases)
        if self.sparse_kernel not in SPARSE_KERNELS:
            _fail("sparse_kernel", self.sparse_kernel, f"one of {', '.join(SPARSE_KERNELS)}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile not in TILES):
            _fail("tile", self.tile, f"None (unstructured masks) or one of {', '.join(map(str, TILES))}")
        if self.tile is not None and self.sparse_kernel == "csr":
            _fail("sparse_kernel", self.sparse_kernel, f"a kernel for tile-structured masks with tile={self.tile} (auto, dense, "
                  "tile or triton): the CSR kernels are for unstructured masks; use sparse_kernel='tile' or drop tile")
        if self.tile is None and self.sparse_kernel in TILE_KERNELS:
            _fail("sparse_kernel", self.sparse_kernel, "auto, dense or csr for unstructured masks: the tile kernels need "
                  "tile-structured masks; set tile (e.g. tile=32, --tile 32) or use sparse_kernel='auto'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an integer")
        if isinstance(self.grow_init_scale, bool) or not isinstance(self.grow_init_scale, (int, float)) \
                or not 0.0 <= self.grow_init_scale <= 10.0:
            _fail("grow_init_scale", self.grow_init_scale, "a number in [0, 10] (0: grown weights start at zero)")
        if self.restoration_shape not in RESTORATION_SHAPES:
            _fail("restoration_shape", self.restoration_shape, f"one of {', '.join(RESTORATION_SHAPES)}")
        if self.attention_restore not in ATTENTION_RESTORES:
            _fail("attention_restore", self.attention_restore, f"one of {', '.join(ATTENTION_RESTORES)}")

        self._check_attention_sites()

    def _check_attention_sites(self) -> None:
        rules = self.attention_sites
        if rules is None:
            return
        allowed = (f"a dict of site name or glob -> a pattern ({', '.join(ATTENTION_PATTERNS)}) or a dict "
                   f"{{phase: pattern}} with phases from {', '.join(PHASES)}")
        if not isinstance(rules, dict):
            _fail("attention_sites", rules, allowed)
        for site, rule in rules.items():
            if not isinstance(site, str) or not site:
                _fail("attention_sites", rules, f"{allowed}; got the key {site!r}")
            if isinstance(rule, str):
                if rule not in ATTENTION_PATTERNS:
                    _fail(f"attention_sites[{site!r}]", rule, f"one of {', '.join(ATTENTION_PATTERNS)} or a dict {{phase: pattern}}")
                continue
            if not isinstance(rule, dict) or not rule:
                _fail(f"attention_sites[{site!r}]", rule, f"one of {', '.join(ATTENTION_PATTERNS)} or a non-empty dict {{phase: pattern}}")
            for phase, pattern in rule.items():
                if phase not in PHASES:
                    _fail(f"attention_sites[{site!r}]", rule, f"phases from {', '.join(PHASES)}; got {phase!r}")
                if pattern not in ATTENTION_PATTERNS:
                    _fail(f"attention_sites[{site!r}][{phase!r}]", pattern, f"one of {', '.join(ATTENTION_PATTERNS)}")
        _set(self, "attention_sites", {k: (dict(v) if isinstance(v, dict) else v) for k, v in rules.items()})

    def attention_pattern(self, site: str, phase: str) -> str:
        """The pattern attention site ``site`` runs in ``phase`` under this config."""
        if phase not in PHASES:
            raise ValueError(f"MSTConfig.attention_pattern: phase={phase!r} is invalid: expected one of {', '.join(PHASES)}")
        pattern = self.attention if phase in self.attention_phases else "dense"
        for glob, rule in (self.attention_sites or {}).items():
            if fnmatch.fnmatchcase(site, glob):
                if isinstance(rule, str):
                    pattern = rule if phase in self.attention_phases else "dense"
                else:
                    pattern = rule.get(phase, pattern)
        return pattern

    def unmatched_attention_sites(self, sites) -> list[str]:
        """The ``attention_sites`` rules that match none of ``sites`` (most likely a typo)."""
        sites = list(sites)
        return [g for g in (self.attention_sites or {}) if not any(fnmatch.fnmatchcase(s, g) for s in sites)]

    @property
    def interval(self) -> int:
        """ΔT in steps: ``update_interval``, or from the run length so that the warm-up ramp gets at least
        five updates (``(t1 - 1) // 5``, at most 100; ``T // 30`` without a warm-up)."""
        if self.update_interval is not None:
            return self.update_interval
        t1 = int(self.warmup_end * self.total_steps + 0.5)
        return max(1, min(100, (t1 - 1) // 5 if t1 else self.total_steps // 30))

    @property
    def phase_drop_fractions(self) -> tuple[float, float, float]:
        """ζ_k for (warmup, ultra, restoration). Restoration drops nothing unless ``drop_fractions`` says
        so: pruning there removes trained weights at the lowest learning rate (docs/design.md §8)."""
        if self.drop_fractions is not None:
            return self.drop_fractions
        return (float(self.drop_fraction), float(self.drop_fraction), 0.0)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["schedule"] is not None:
            d["schedule"] = [list(p) for p in d["schedule"]]
        for k in ("drop_fractions", "attention_phases"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MSTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"MSTConfig got unknown keys {unknown}: allowed keys are {', '.join(sorted(known))}"
            )
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> MSTConfig:
        """A named recipe plus ``changes``: ``"default"`` (this class's defaults) or ``"paper"`` (the
        published recipe: ΔT = 100, ζ = 0.3 in every phase, HSA in the ultra phase only, attention
        switched back to dense at once, grown weights at zero; the paper's learning rate is a cosine:
        ``mstc train --lr-schedule cosine``, the trainer's choice like every learning rate)."""
        if name not in PRESETS:
            raise ValueError(f"MSTConfig.preset({name!r}) is unknown: expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def replace(self, **changes: Any) -> MSTConfig:
        """A copy with ``changes`` applied, validated like a new config."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": dict(update_interval=100, drop_fraction=0.3, drop_fractions=(0.3, 0.3, 0.3), attention_phases=("ultra",),
                  attention_restore="switch", grow_init_scale=0.0, final_sparsity=0.5,
                  restoration_shape="late",
                  sparsity=0.9, warmup_end=0.1, ultra_end=0.8),
}
