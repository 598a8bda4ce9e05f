"""MSTConfig: the recipe of Mixed Sparsity Training (docs/design.md §2-5), validated on construction.

The method's knobs sit at the top level; the switches that only ablations turn sit in ``Ablation``.
The run's length and seed are not part of the recipe: they are passed once, to
``sparsify(model, config, total_steps=..., seed=...)`` (``mstc train``: ``--steps``, ``--seed``).
Each field's facts (range, help, flag) are written once, in its ``knob`` (``fields.py``); validation,
TOML keys and the ``mstc`` flags come from them.

Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from .constants import (
    ATTENTION_PATTERNS,
    ATTENTION_RESTORES,
    DISTRIBUTIONS,
    LR_DENSITY_SCOPES,
    PHASES,
    RESTORATION_SHAPES,
    SPARSE_KERNELS,
    TILE_KERNELS,
    TILES,
)
from .fields import Bad, Choice, Integer, Kind, Number, Optional, fail, is_number, knob, refuse_gone, validate

__all__ = ["Ablation", "MSTConfig", "PRESETS", "ATTENTION_PATTERNS", "ATTENTION_RESTORES", "DISTRIBUTIONS", "PHASES",
           "RESTORATION_SHAPES", "SPARSE_KERNELS"]


class _Points(Kind):
    """``schedule``: (step, sparsity) points; the flag's form is ``0:0,100:0.9,1000:0.5``."""

    expected = "a non-empty list of (step, sparsity) pairs"

    def norm(self, v):
        try:
            pts = [tuple(p) for p in v]
        except TypeError:
            raise Bad from None
        if not pts or any(len(p) != 2 or not is_number(p[0]) or not is_number(p[1]) for p in pts):
            raise Bad
        steps = [p[0] for p in pts]
        if any(int(s) != s or s < 0 for s in steps) or steps != sorted(set(steps)):
            raise Bad("steps that are integers >= 0 in strictly increasing order")
        if any(not 0.0 <= p[1] < 1.0 for p in pts):
            raise Bad("sparsities in [0, 1)")
        return [(int(s), float(x)) for s, x in pts]

    def parse(self, text):
        try:
            return [(int(s), float(x)) for s, x in (p.split(":") for p in text.split(",") if p.strip())]
        except ValueError:
            raise Bad("STEP:SPARSITY pairs like 0:0,100:0.9,1000:0.5") from None


class _DropFraction(Kind):
    """``drop_fraction``: ζ per phase (warmup, ultra, restoration); one number ζ means (ζ, ζ, 0)."""

    expected = "a number in [0, 1] (warm-up and ultra; restoration drops nothing) or three numbers in [0, 1] " \
               "(warmup, ultra, restoration)"

    def norm(self, v):
        if is_number(v):
            v = (v, v, 0.0)
        try:
            zs = tuple(v)
        except TypeError:
            raise Bad from None
        if len(zs) != 3 or any(not is_number(z) or not 0.0 <= z <= 1.0 for z in zs):
            raise Bad
        return tuple(float(z) for z in zs)

    def parse(self, text):
        try:
            zs = [float(z) for z in text.split(",")]
        except ValueError:
            raise Bad("a number like 0.3 or three numbers like 0.3,0.3,0") from None
        return zs[0] if len(zs) == 1 else tuple(zs)


class _Phases(Kind):
    """``attention_phases``: phase names; the flag's form is ``ultra`` or ``warmup,ultra``."""

    expected = f"phase names from {', '.join(PHASES)}"

    def norm(self, v):
        phases = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else None
        if phases is None or any(p not in PHASES for p in phases):
            raise Bad
        return phases

    def parse(self, text):
        return tuple(p.strip() for p in text.split(",") if p.strip())


class _SiteRules(Kind):
    """``attention_sites``: site name or glob -> a pattern, or a ``{phase: pattern}`` dict."""

    expected = (f"a dict of site name or glob -> a pattern ({', '.join(ATTENTION_PATTERNS)}) or a dict "
                f"{{phase: pattern}} with phases from {', '.join(PHASES)}")

    def norm(self, rules):
        """Raises the old one-line messages naming the rule (``MSTConfig.attention_sites['h.0.attn']=...``)."""
        if rules is None:
            return None
        if not isinstance(rules, dict):
            raise Bad
        patterns = ", ".join(ATTENTION_PATTERNS)

        def fail(where: str, value: Any, expected: str) -> None:
            raise ValueError(f"MSTConfig.attention_sites{where}={value!r} is invalid: expected {expected}")

        for site, rule in rules.items():
            if not isinstance(site, str) or not site:
                raise Bad(f"{self.expected}; got the key {site!r}")
            if isinstance(rule, str):
                if rule not in ATTENTION_PATTERNS:
                    fail(f"[{site!r}]", rule, f"one of {patterns} or a dict {{phase: pattern}}")
                continue
            if not isinstance(rule, dict) or not rule:
                fail(f"[{site!r}]", rule, f"one of {patterns} or a non-empty dict {{phase: pattern}}")
            for phase, pattern in rule.items():
                if phase not in PHASES:
                    fail(f"[{site!r}]", rule, f"phases from {', '.join(PHASES)}; got {phase!r}")
                if pattern not in ATTENTION_PATTERNS:
                    fail(f"[{site!r}][{phase!r}]", pattern, f"one of {patterns}")
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in rules.items()}

    def parse(self, texts):
        """``--attention-sites`` values: ``SITE=PATTERN`` or ``SITE=PHASE:PATTERN,PHASE:PATTERN`` each
        (SITE a name or fnmatch glob), in order; later rules override earlier ones."""
        rules: dict = {}
        for text in texts:
            site, sep, spec = text.rpartition("=")
            parts = [p.strip() for p in spec.split(",") if p.strip()]
            phased = [":" in p for p in parts]
            if not sep or not site.strip() or not parts or not (all(phased) or parts == [spec.strip()]):
                raise Bad("SITE=PATTERN or SITE=PHASE:PATTERN,... like 'h.*.attn=local' or 'h.0.attn=ultra:dense'")
            rules[site.strip()] = {k.strip(): v.strip() for k, v in (p.split(":", 1) for p in parts)} if all(phased) else parts[0]
        return rules


_STRIDE = Optional(Integer(1), "None (T/8) or an integer >= 1", nulls=("none", "auto"))


@dataclass(frozen=True)
class Ablation:
    """Switches of the recipe that only ablations turn; the defaults are the method (docs/design.md §8).
    ``MSTConfig(ablation=Ablation(restoration_shape="linear"))``; flags: ``--restoration-shape linear``."""

    grow_init_scale: float = knob(0.0, Number(0.0, 10.0, "a number in [0, 10] (0: grown weights start at zero)"),
                                  "Grown weights start at N(0, (scale x rms of active weights)^2); 0: at zero "
                                  "(0.5 and 1 measured +27% and +146% to dense against +9%).")
    attention_restore: str = knob("switch", Choice(ATTENTION_RESTORES),
                                  "Leaving the sparse-attention phases: switch (dense at once) or widen (gradually).")
    restoration_shape: str = knob("late", Choice(RESTORATION_SHAPES),
                                  "When restored weights return: late (1-u^3), linear, or early ((1-u)^3).")

    def __post_init__(self) -> None:
        validate(self, "Ablation")


GONE = {  # removed keywords and keys: what each became
    "total_steps": "the run length is passed once, to sparsify(model, config, total_steps=...) (mstc train --steps, "
                   "[train] steps)",
    "seed": "the seed is passed once, to sparsify(model, config, seed=...) (mstc train --seed, [train] seed)",
    "drop_fractions": "use drop_fraction=(warmup, ultra, restoration) (--drop-fraction 0.3,0.3,0)",
    "extra": "MSTConfig holds only the recipe; keep notes beside it",
    **{k: f"use ablation=Ablation({k}=...) (--{k.replace('_', '-')}, [mst.ablation] {k})"
       for k in ("grow_init_scale", "attention_restore", "restoration_shape")},
}


@dataclass(frozen=True)
class MSTConfig:
    """The MST recipe. Frozen: every field is validated once, here, so a config that exists is valid;
    change one with ``cfg.replace(sparsity=0.9)`` (validated again).

    Sparsity variation (docs/design.md §3): a cubic ramp from dense to ``sparsity`` over ``[0, warmup_end*T)``
    (none by default: sparse from step 0), constant ``sparsity`` until ``ultra_end*T``, then restoration down to
    ``final_sparsity`` at the run's end T (``sparsify(..., total_steps=T)``). ``schedule`` replaces all
    of that with any piecewise linear list of ``(step, sparsity)`` points.

    Attention (docs/design.md §5): every site runs ``attention`` in ``attention_phases`` and dense causal
    elsewhere, unless a rule of ``attention_sites`` matches it. That dict maps a site name or an
    ``fnmatch`` glob (``"h.*.attn"``; ``*`` also crosses dots) to either one pattern, used in
    ``attention_phases`` with dense elsewhere, or a ``{phase: pattern}`` dict that sets only the
    phases it names. Rules apply in order and a later match overrides an earlier one, e.g.
    ``{"h.*.attn": "local", "h.0.attn": "dense"}`` keeps the first layer dense. ``attention_depth`` is the
    same choice for any model: the first share of its sites (in the capture's order, from the input)
    keep ``attention``, the deeper ones run dense causal attention, before any rule. See
    :meth:`attention_pattern`.

    ``tile`` makes the masks tile-structured (a variant of the method, docs/design.md §9).
    ``sparse_kernel`` is execution, not method: which kernel runs the sparse linears (the numbers agree
    up to float rounding). It stays here because it is checked against ``tile`` on construction and every
    entry point (``sparsify``, ``mstc train``, the HF callback) reads it from the config alike.
    """

    sparsity: float = knob(0.85, Number(0.0, 1.0, "a number in [0, 1)", hi_open=True),
                           "Sparsity of the ultra-sparsification phase (s_max).")
    final_sparsity: float = knob(0.5, Number(0.0, 1.0, "a number in [0, 1)", hi_open=True),
                                 "Sparsity at the end of restoration (s_end).")
    warmup_end: float = knob(0.0, Number(0.0, 1.0, "a fraction of the run in [0, 1]"),
                             "End of the MST warm-up phase as a fraction of steps.")
    ultra_end: float = knob(0.8, Number(0.0, 1.0, "a fraction of the run in [0, 1]"),
                            "End of the ultra phase as a fraction of steps.")
    schedule: list[tuple[int, float]] | None = knob(
        None, Optional(_Points(), "None or a non-empty list of (step, sparsity) pairs"),
        "Piecewise-linear sparsity schedule STEP:SPARSITY,... (replaces the three phases).", means="the three phases")
    distribution: str = knob("er", Choice(DISTRIBUTIONS, gone={"erk": "uniform or er: 'erk' allocated exactly like 'er' "
                                                                    "on the 2-D weights MST sparsifies; use distribution='er'"}),
                             "Layer-wise density distribution.")
    update_interval: int | None = knob(None, Optional(Integer(1), "None (from the run length) or an integer >= 1"),
                                       "Steps between topology updates.", means="from the run length")
    drop_fraction: tuple[float, float, float] = knob(
        (0.3, 0.3, 0.0), _DropFraction(),
        "Drop fraction: one number for warm-up and ultra (restoration drops nothing), or WARMUP,ULTRA,RESTORATION.")
    grow_gradient_fraction: float = knob(0.75, Number(0.0, 1.0, "a number in [0, 1]"),
                                         "Share of regrown weights picked by gradient (rest random; 1: RigL, 0: SET).")
    lr_density_power: float = knob(0.5, Number(0.0, 2.0, "a number in [0, 2] (0: the learning rate ignores density)"),
                                   "Scale the learning rate by (1/density)^POWER, density being the sparse weights' "
                                   "overall density at that step (0: off).")
    lr_density_scope: str = knob("run", Choice(LR_DENSITY_SCOPES),
                                 "Which density lr_density_power follows: run (the sparse weights' overall density, "
                                 "applied to every parameter) or weight (each sparse weight's own; other parameters keep "
                                 "the curve).")
    attention: str = knob("sparse", Choice(ATTENTION_PATTERNS), "Sparse attention pattern.")
    stride: int | None = knob(None, _STRIDE, "Sparse attention stride.", means="T/8")
    attention_phases: tuple[str, ...] = knob(PHASES, _Phases(),
                                             "Phases that use the sparse attention pattern, e.g. ultra or warmup,ultra.")
    attention_depth: float = knob(0.5, Number(0.0, 1.0, "a fraction of the attention sites in [0, 1]"),
                                  "Share of attention sites, first in the model's order, that run the sparse pattern "
                                  "(rounded up); the deeper ones run dense causal attention (1: every site).")
    attention_sites: dict[str, str | dict[str, str]] | None = knob(
        None, _SiteRules(), "Per-site attention rule SITE=PATTERN or SITE=PHASE:PATTERN,... (SITE: name or glob; "
        "repeatable, later rules win), e.g. 'h.*.attn=local' 'h.0.attn=ultra:dense'.",
        means="none", metavar="SITE=PATTERN", multiple=True)
    tile: int | None = knob(None, Optional(Choice(TILES), f"None (unstructured masks) or one of {', '.join(map(str, TILES))}"),
                            "Tile-structured masks: constant on TILE x TILE tiles (8, 16, 32, 64 or 128).",
                            means="none: unstructured masks")
    sparse_kernel: str = knob("auto", Choice(SPARSE_KERNELS),
                              "Sparse linear kernel (execution only; tile, triton: tile-structured masks only).")
    ablation: Ablation = knob(Ablation, Kind(), "Switches only ablations turn (Ablation).", flags=())

    def __post_init__(self) -> None:
        if isinstance(self.ablation, dict):
            object.__setattr__(self, "ablation", Ablation(**self.ablation))
        elif not isinstance(self.ablation, Ablation):
            fail("MSTConfig", "ablation", self.ablation, "an Ablation (or a dict of its fields)")
        validate(self, "MSTConfig")
        if self.warmup_end > self.ultra_end:
            fail("MSTConfig", "ultra_end", self.ultra_end, f"a fraction >= warmup_end ({self.warmup_end})")
        if self.tile is not None and self.sparse_kernel == "csr":
            fail("MSTConfig", "sparse_kernel", self.sparse_kernel, f"a kernel for tile-structured masks with tile={self.tile} "
                 "(auto, dense, tile or triton): the CSR kernels are for unstructured masks; use sparse_kernel='tile' or drop tile")
        if self.tile is None and self.sparse_kernel in TILE_KERNELS:
            fail("MSTConfig", "sparse_kernel", self.sparse_kernel, "auto, dense or csr for unstructured masks: the tile "
                 "kernels need tile-structured masks; set tile (e.g. tile=32, --tile 32) or use sparse_kernel='auto'")

    def attention_pattern(self, site: str, phase: str, sites: list[str] | None = None) -> str:
        """The pattern attention site ``site`` runs in ``phase`` under this config. ``sites``: the model's
        attention sites in order (the capture's), needed when ``attention_depth < 1``."""
        if phase not in PHASES:
            raise ValueError(f"MSTConfig.attention_pattern: phase={phase!r} is invalid: expected one of {', '.join(PHASES)}")
        pattern = self.attention if phase in self.attention_phases else "dense"
        if self.attention_depth < 1.0:
            order = list(sites or ())
            if site not in order:
                raise ValueError(f"MSTConfig.attention_pattern: attention_depth={self.attention_depth} needs the model's "
                                 f"attention sites in order, and {site!r} is not one of {order}")
            if order.index(site) >= math.ceil(self.attention_depth * len(order) - 1e-9):  # 0.3 * 10 is 3.0000000000000004
                pattern = "dense"
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

    def check_attention_sites(self, sites) -> None:
        """Raise when a rule of ``attention_sites`` matches none of a model's attention ``sites``."""
        unmatched = self.unmatched_attention_sites(sites)
        if unmatched:
            raise ValueError(
                f"MSTConfig.attention_sites: the rule(s) {unmatched} match no attention site of this model; "
                f"its sites are {list(sites) or 'none'} (site names or fnmatch globs)")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), the ``ablation`` group as a nested dict: what ``from_dict`` reads."""
        d = dataclasses.asdict(self)
        if d["schedule"] is not None:
            d["schedule"] = [list(p) for p in d["schedule"]]
        for k in ("drop_fraction", "attention_phases"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MSTConfig:
        refuse_gone("MSTConfig", d, GONE)
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ValueError(f"MSTConfig got unknown keys {unknown}: allowed keys are {', '.join(sorted(KEYS))}")
        ablation = d.get("ablation")
        if isinstance(ablation, dict):
            bad = sorted(set(ablation) - set(ABLATION_KEYS))
            if bad:
                raise ValueError(f"Ablation got unknown keys {bad}: allowed keys are {', '.join(ABLATION_KEYS)}")
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


def _refusing(cls: type, gone: dict[str, str]) -> None:
    """Make ``cls(...)`` (and ``replace``) answer a removed keyword with what it became, in one line."""
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        refuse_gone(cls.__name__, kwargs, gone)
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    cls.__init__ = __init__


_refusing(MSTConfig, GONE)

KEYS = tuple(f.name for f in dataclasses.fields(MSTConfig))
ABLATION_KEYS = tuple(f.name for f in dataclasses.fields(Ablation))

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": dict(update_interval=100, drop_fraction=(0.3, 0.3, 0.3), attention_phases=("ultra",),
                  ablation=Ablation(attention_restore="switch", grow_init_scale=0.0, restoration_shape="late"),
                  final_sparsity=0.5, sparsity=0.9, warmup_end=0.1, ultra_end=0.8, lr_density_power=0.0, attention_depth=1.0),
}
