"""``mst_compile.plan``: what an MST run will cost and save, before it runs.

The FLOPs are the runtime ledger's own count: the model is captured and sparsified as for training,
one forward at batch 1 shows the ledger's hooks its footprint (rows per sparse weight, attention
calls, dense work), and ``runtime/forecast.py`` walks the schedule with the ledger's per-step
formula. So the plan of a run equals the ledger total of that run (tests check it).

Hours are estimates: FLOPs divided by a device's peak bf16 FLOP/s times an assumed utilisation, with
each part at the speed this library's kernels run on that device (``kernels_note``): on GPUs the sparse
linears are masked dense GEMMs, and neither the tile kernels nor HSA have a measured speed-up there
yet, so they count at dense speed; on CPU the CSR kernels beat dense below density 0.22, the blocked
tile kernel below its measured crossover (``TILE_POINTS``), and HSA runs at its measured speed-up. The expected
quality gap is read off the regime map (``benchmarks/regime.py``, ``regime_map.json``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import PRESETS, MSTConfig
from .errors import MstCompileError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (vendor figure; CPU: an assumption, see HARDWARE)
    utilization: float  # the fraction of peak a well-tuned dense training step reaches
    kind: str  # "gpu" | "cpu": which kernels the speed model uses


HARDWARE = {
    "a100": Hardware("A100 (bf16 dense 312 TFLOP/s)", 312e12, 0.40, "gpu"),
    "h100": Hardware("H100 SXM (bf16 dense 989 TFLOP/s)", 989e12, 0.40, "gpu"),
    "h200": Hardware("H200 (bf16 dense 989 TFLOP/s)", 989e12, 0.40, "gpu"),
    "cpu": Hardware("CPU (assumed 2 TFLOP/s: a 32-core AVX-512 server)", 2e12, 0.50, "cpu"),
}

# Measured kernel speed-ups against dense (README "Performance", CPU, one thread, fwd + bwd):
# CSR sparse linear 3.45x at density 0.05, 2.1x at 0.1, break-even at the 0.22 crossover (masked
# dense above it); HSA 3.85x at T = 1024, l = 128, where its FLOP ratio is 4.14x; the MST step
# costs 1.029x the dense step in runtime overhead. Nothing has been measured on a GPU yet.
_CSR_POINTS = ((0.05, 3.45), (0.10, 2.1), (0.22, 1.0))
# The blocked CPU tile kernel (tile-structured masks, MSTConfig.tile), per tile edge: (tile density,
# speed-up), the mean of the four GPT-2-small shapes of `benchmarks/kernels.py --only tiles` (one thread,
# 1024 tokens, fwd + bwd), ending at ops/tile_linear.py's crossover, above which "auto" runs masked dense.
TILE_POINTS = {
    8: ((0.0, 1.0),),  # never faster than dense: "auto" keeps 8x8 tiles on the masked dense kernel
    16: ((0.05, 4.28), (0.1, 2.57), (0.2, 1.35), (0.23, 1.0)),
    32: ((0.05, 6.48), (0.1, 3.28), (0.2, 1.87), (0.3, 1.33), (0.39, 1.0)),
    64: ((0.05, 8.95), (0.1, 5.53), (0.2, 3.07), (0.3, 2.09), (0.5, 1.32), (0.61, 1.0)),
    128: ((0.05, 10.02), (0.1, 6.42), (0.2, 3.54), (0.3, 2.45), (0.5, 1.60), (0.69, 1.0)),
}
_HSA_EFFICIENCY = 3.85 / 4.14  # measured speed-up / FLOP ratio at T = 1024
_CPU_OVERHEAD = 1.029


def kernels_note(kind: str, tile: int | None) -> str:
    """How ``plan`` times each part on a device kind, in words (the ``kernels`` line of the plan)."""
    if kind == "gpu":
        linear = ("tile-sparse linears (Triton) not yet measured on a GPU: counted at dense speed" if tile else
                  "sparse linears run as masked dense GEMMs (no faster than dense)")
        return f"{linear}; HSA on CUDA not yet measured, counted at dense speed"
    if tile and len(TILE_POINTS[tile]) == 1:
        linear = f"{tile}x{tile}-tile sparse linears as masked dense GEMMs (the blocked kernel was never faster at this tile)"
    elif tile:
        pts = TILE_POINTS[tile]
        measured = ", ".join(f"{s:.2f}x at {d:g}" for d, s in pts[:-1])
        linear = (f"{tile}x{tile}-tile sparse linears on the blocked kernel below tile density {pts[-1][0]:g} at their measured "
                  f"speed-up ({measured}), masked dense above")
    else:
        linear = "CSR sparse linears below density 0.22 at their measured speed-up (3.45x at 0.05, 2.1x at 0.1), masked dense above"
    return f"{linear}; HSA at its measured efficiency (93% of its FLOP ratio at T=1024); MST step overhead 1.029x"


def _interpolate(points, density: float) -> float:
    """Speed-up at ``density`` between measured (density, speed-up) points; 1 at and above the last
    (the crossover: "auto" keeps the masked dense kernel there); no more than the first below it."""
    if density >= points[-1][0]:
        return 1.0
    if density <= points[0][0]:
        return points[0][1]
    for (d0, s0), (d1, s1) in zip(points, points[1:]):
        if density <= d1:
            return s0 + (s1 - s0) * (density - d0) / (d1 - d0)
    return 1.0


def _cpu_attention_speed(pattern: str, T: int, stride: int | None) -> float:
    from .ops.attention import mean_attended_keys

    if pattern == "dense":
        return 1.0
    return max(1.0, _HSA_EFFICIENCY * (T + 1) / 2 / mean_attended_keys(pattern, T, stride))


def _speed(kind: str, tile: int | None = None):
    if kind == "cpu":
        points = _CSR_POINTS if tile is None else TILE_POINTS[tile]
        return (lambda density: _interpolate(points, density)), _cpu_attention_speed
    return (lambda density: 1.0), (lambda pattern, T, stride: 1.0)


@dataclass
class TrainingPlan:
    """The figures ``mstc plan`` prints (``as_dict()`` is its ``--json``)."""

    model: str
    params: int
    tokens: int
    steps: int
    tokens_per_step: int
    block_size: int
    dense_flops: float
    mst_flops: float
    phases: list[dict]
    hardware: dict
    dense_hours: float
    mst_hours: float
    expected_gap: float | None  # % above dense in final loss, from the regime map's fit
    extrapolated: bool  # tokens/param outside the map's measured range (or no map)
    regime: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def reduction(self) -> float:
        return self.dense_flops / self.mst_flops

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "tokens": self.tokens, "tokens_per_param": self.tokens_per_param,
                "steps": self.steps, "tokens_per_step": self.tokens_per_step, "block_size": self.block_size,
                "dense_flops": self.dense_flops, "mst_flops": self.mst_flops, "reduction": self.reduction,
                "flops_are": "algorithmic training FLOPs of the whole model (the runtime ledger's count)",
                "phases": self.phases, "hardware": self.hardware, "dense_hours": self.dense_hours,
                "mst_hours": self.mst_hours, "expected_gap": self.expected_gap, "extrapolated": self.extrapolated,
                "regime": self.regime, "config": self.config}

    def render(self) -> str:
        hw = self.hardware
        lines = [f"plan for {self.model}",
                 f"  parameters        {self.params:,}",
                 f"  tokens            {self.tokens:,} ({self.steps:,} steps x {self.tokens_per_step:,} tokens, T={self.block_size})",
                 f"  tokens/param      {self.tokens_per_param:,.1f}",
                 f"  dense FLOPs       {self.dense_flops:.3e}",
                 f"  MST FLOPs         {self.mst_flops:.3e}  ({self.reduction:.2f}x fewer, algorithmic)"]
        for p in self.phases:
            lines.append(f"    {p['phase']:<12s}    {p['mst_flops']:.3e} in {p['steps']:,} steps "
                         f"({p['dense_flops'] / p['mst_flops']:.2f}x)")
        lines += [f"  hardware          {hw['name']}, {hw['utilization']:.0%} utilisation",
                  f"  dense time        {_duration(self.dense_hours)} on one device",
                  f"  MST time          {_duration(self.mst_hours)} on one device ({self.dense_hours / self.mst_hours:.2f}x "
                  "realised with this library's kernels)",
                  f"  kernels           {hw['kernels']}"]
        r = self.regime
        if self.expected_gap is None:
            lines.append(f"  expected gap      unknown ({r.get('note', 'no regime map')})")
        else:
            mark = " EXTRAPOLATED" if self.extrapolated else ""
            lo, hi = r["measured_range"]
            lines.append(f"  expected gap      {self.expected_gap:+.1f}% final loss vs dense{mark} (regime map of {r['series']}: "
                         f"measured {lo:,.0f}-{hi:,.0f} tokens/param; {r['note']})")
        return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:,.1f} h ({hours / 24:,.1f} days)" if hours >= 48 else f"{hours:,.1f} h"


# -- the regime map ----------------------------------------------------------------------------
def regime_map() -> dict | None:
    """The fit ``benchmarks/regime.py --package`` wrote, or None when the package has none."""
    try:
        text = resources.files("mst_compile").joinpath("regime_map.json").read_text()
    except (FileNotFoundError, OSError):
        return None
    return json.loads(text)


def _series_for(config: MSTConfig) -> tuple[str, str]:
    """Which measured config of the map this one is (ignoring length, seed and ΔT), and a note."""
    neutral = dict(total_steps=1000, seed=0, update_interval=None)
    for name in ("default", "paper"):
        if config.replace(**neutral) == MSTConfig(**{**PRESETS[name], **neutral}):
            return name, f"this config is the {name} one"
    return "default", "this config differs from both measured ones; read off the defaults' curve"


def expected_gap(config: MSTConfig, tokens_per_param: float) -> tuple[float | None, bool, dict]:
    """(gap %, extrapolated?, what it was read from) for a run at ``tokens_per_param``."""
    m = regime_map()
    if m is None:
        return None, True, {"note": "no regime map in this installation (run benchmarks/regime.py --package)"}
    series, note = _series_for(config)
    fit = m["configs"][series]["fit"]
    lo, hi = m["measured_range"]
    info = {"series": series, "measured_range": [lo, hi], "fit": fit, "note": note,
            "within_5pct_at": m["configs"][series]["within_5pct_at"], "source": m["source"]}
    if fit is None:
        return None, True, {**info, "note": "the map has no fit for this config"}
    return fit["a"] * tokens_per_param ** (-fit["b"]), not lo <= tokens_per_param <= hi, info


def regime_warning(config: MSTConfig, tokens_per_param: float) -> str | None:
    """A warning for a run below the tokens/param where the regime map found MST within 5% of
    dense (None when it is not, or when there is no map)."""
    m = regime_map()
    if m is None:
        return None
    series, _ = _series_for(config)
    c = m["configs"][series]
    x5, pts = c["within_5pct_at"], c["points"]
    if x5 is not None and tokens_per_param >= x5:
        return None
    near = min(pts, key=lambda p: abs(math.log(p["tokens_per_param"] / tokens_per_param))) if pts else None
    seen = "" if near is None else (f" (measured: {near['gap_pct']:+.1f}% at {near['tokens_per_param']:,.0f} tokens/param, "
                                    f"{near['reduction']:.1f}x fewer FLOPs)")
    lo, hi = m["measured_range"]
    where = ("it stays above 5% across the measured range "
             f"{lo:,.0f}-{hi:,.0f} tokens/param" if x5 is None else
             f"it comes within 5% of dense from about {x5:,.0f} tokens/param"
             + ("" if lo <= x5 <= hi else f" (extrapolated beyond the measured {lo:,.0f}-{hi:,.0f})"))
    ratio = f"{tokens_per_param:,.1f}" if tokens_per_param >= 1 else f"{tokens_per_param:.2g}"
    return (f"this run trains {ratio} tokens per parameter; on the regime map (benchmarks/regime.py) MST "
            f"with the {series} config ends further from dense at this ratio{seen}: {where}. "
            "`mstc plan` shows the expected gap for a budget")


# -- building the model -----------------------------------------------------------------------
def _load(model, block_size: int | None):
    """(module, name, inputs(tokens)) from a module, a model file (.py) or an HF config (.json)."""
    from torch import nn

    if isinstance(model, nn.Module):
        return model, type(model).__name__, lambda tokens: (tokens,)
    path = Path(getattr(model, "path", model))
    if path.suffix == ".json":
        if not path.is_file():
            raise MstCompileError(f"HF config {path} does not exist: pass the path of a config.json")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        except Exception as e:  # noqa: BLE001 - any failure to build is the user's config: one line
            raise MstCompileError(f"cannot build a causal LM from {path}: {type(e).__name__}: {e}") from e
        return hf, str(path), lambda tokens: {"input_ids": tokens}
    from .modelfile import ModelFile, load_model_file

    mf = model if isinstance(model, ModelFile) else load_model_file(path)
    m = mf.model()
    path = mf.path
    return m, str(path), mf.inputs_for(m)


def plan(model, tokens: int, *, config: MSTConfig | dict | None = None, block_size: int | None = None,
         batch_size: int = 16, hardware: str | Hardware = "h100", peak_flops: float | None = None,
         utilization: float | None = None, progress=None) -> TrainingPlan:
    """The FLOPs, time and expected quality gap of MST-training ``model`` on ``tokens`` tokens.

    ``model``: an ``nn.Module``, a model file (``model()``, as ``mstc train`` takes) or a Hugging Face
    ``config.json``. ``batch_size`` sequences of ``block_size`` tokens (default: the model's maximum
    length, else 128) make one optimizer step; ``config.total_steps`` becomes tokens / that.
    ``progress(message)`` hears about each stage (a large model takes minutes to capture and measure).
    """
    import torch

    from .api import _as_config, sparsify
    from .capture import split_inputs
    from .modelfile import max_sequence_length, parameter_count
    from .runtime import schedule
    from .runtime.forecast import forecast

    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0 or not math.isfinite(tokens):
        raise ValueError(f"plan: tokens={tokens!r} is invalid: expected a positive number of training tokens")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"plan: batch_size={batch_size!r} is invalid: expected an integer >= 1")
    hw = _hardware(hardware, peak_flops, utilization)
    net, name, inputs = _load(model, block_size)
    T = block_size or max_sequence_length(net) or 128
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"plan: block_size={T!r} is invalid: expected an integer >= 1")
    per_step = batch_size * T
    steps = max(1, round(tokens / per_step))
    cfg = _as_config(config).replace(total_steps=steps)
    schedule.check(cfg)
    example = inputs(torch.zeros(1, T, dtype=torch.long))
    args, kwargs = split_inputs(example)
    params = parameter_count(net)
    say = progress or (lambda message: None)
    say(f"capturing {name} ({params:,} parameters) ...")
    sm = sparsify(net, cfg, example_inputs=example)
    say(f"one forward at batch 1, T={T}, through the FLOP ledger's hooks ...")
    fp = sm.mst.footprint(*args, **kwargs)
    say(f"walking the schedule: {steps:,} steps ...")
    fc = forecast(fp, cfg, sm.mst.allocation, sm.mst.units(), per_step, stride=cfg.stride, speed=_speed(hw.kind, cfg.tile))
    rate = hw.peak_flops * hw.utilization * 3600.0
    overhead = _CPU_OVERHEAD if hw.kind == "cpu" else 1.0
    gap, extrapolated, regime = expected_gap(cfg, steps * per_step / params)
    return TrainingPlan(
        model=name, params=params, tokens=steps * per_step, steps=steps, tokens_per_step=per_step, block_size=T,
        dense_flops=fc.dense_flops, mst_flops=fc.mst_flops, phases=[p.as_dict() for p in fc.phases],
        hardware={"name": hw.name, "peak_flops": hw.peak_flops, "utilization": hw.utilization, "kind": hw.kind,
                  "kernels": kernels_note(hw.kind, cfg.tile)},
        dense_hours=fc.dense_flops / rate, mst_hours=sum(p.realised for p in fc.phases) * overhead / rate,
        expected_gap=gap, extrapolated=extrapolated, regime=regime, config=cfg.to_dict())


def _hardware(hardware: str | Hardware, peak_flops: float | None, utilization: float | None) -> Hardware:
    if isinstance(hardware, Hardware):
        hw = hardware
    elif isinstance(hardware, str) and hardware.lower() in HARDWARE:
        hw = HARDWARE[hardware.lower()]
    else:
        raise ValueError(f"plan: hardware={hardware!r} is unknown: expected one of {', '.join(HARDWARE)} "
                         "(or give peak_flops and utilization)")
    if peak_flops is not None:
        if not isinstance(peak_flops, (int, float)) or not peak_flops > 0:
            raise ValueError(f"plan: peak_flops={peak_flops!r} is invalid: expected FLOP/s > 0")
        hw = Hardware(f"{hw.name}, peak set to {peak_flops:.3g} FLOP/s", float(peak_flops), hw.utilization, hw.kind)
    if utilization is not None:
        if not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"plan: utilization={utilization!r} is invalid: expected a fraction in (0, 1]")
        hw = Hardware(hw.name, hw.peak_flops, float(utilization), hw.kind)
    return hw
