"""``mst_compile.plan``: what an MST run will cost and save, before it runs.

The FLOPs are the runtime ledger's own count: the model is captured and sparsified as for training,
one forward at batch 1 shows the ledger's hooks its footprint (rows per sparse weight, attention
calls, dense work), and ``runtime/forecast.py`` walks the schedule with the ledger's per-step
formula. So the plan of a run equals the ledger total of that run (tests check it).

Hours on this machine (``hardware="local"`` or ``"cpu"``) come from measured step times
(``timing.py``): a dense training step and an MST step in each phase's state, times the steps. Hours
on a GPU preset are estimates: FLOPs divided by its peak bf16 FLOP/s times an assumed utilisation;
there the sparse linears are masked dense GEMMs (no faster than dense) and HSA has no measured
speed-up yet, so the MST run takes as long as the dense one. The expected quality gap is read off
the regime map (``benchmarks/regime.py``, ``regime_map.json``).
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
    peak_flops: float  # dense bf16 FLOP/s (vendor figure)
    utilization: float  # the fraction of peak a well-tuned dense training step reaches


# GPU presets: FLOP/s estimates. "local" and "cpu" are timed on this machine instead (MEASURED).
HARDWARE = {
    "a100": Hardware("A100 (bf16 dense 312 TFLOP/s)", 312e12, 0.40),
    "h100": Hardware("H100 SXM (bf16 dense 989 TFLOP/s)", 989e12, 0.40),
    "h200": Hardware("H200 (bf16 dense 989 TFLOP/s)", 989e12, 0.40),
}
MEASURED = ("local", "cpu")  # local: this machine's GPU when it has one, else its CPU


def gpu_kernels(tile: int | None) -> str:
    """What a GPU preset assumes of this library's kernels, in words (the plan's ``kernels`` line)."""
    linear = ("tile-sparse linears (Triton) not yet measured on a GPU: counted at dense speed" if tile else
              "sparse linears run as masked dense GEMMs (no faster than dense)")
    return f"{linear}; HSA on CUDA not yet measured, counted at dense speed"


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
    # MST's active parameters averaged over the run's steps: the size of the dense model that sparse
    # pre-training ends near (Jin et al. 2025, arXiv 2501.12486), the baseline to beat at these FLOPs
    avg_active_params: float = 0.0

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
                "regime": self.regime, "config": self.config, "avg_active_params": self.avg_active_params}

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
        speedup = f"{self.dense_hours / self.mst_hours:.2f}x"
        if "measured" in hw:  # timed here
            m, B = hw["measured"], self.tokens_per_step // self.block_size
            per = ", ".join(f"{p['phase']} {m['step_s'][p['phase']]:.3g} s" for p in self.phases)
            proxy = "" if m["batch_size"] == B else (f", timed at batch {m['batch_size']} of {B}: forward and backward "
                                                     "scaled by the sequences, the optimizer step once")
            lines += [f"  hardware          this machine ({m['device']}): timed, not estimated",
                      f"  step time         dense {m['step_s']['dense']:.3g} s; MST {per} (median of {min(m['repeats'].values())}+ "
                      f"steps after a warm-up step, fp32{proxy}; the {m['updates']:,} topology updates not timed)",
                      f"  dense time        {_duration(self.dense_hours)} here ({self.steps:,} steps x the measured dense step)",
                      f"  MST time          {_duration(self.mst_hours)} here (each phase's steps x its measured step: {speedup})"]
        else:
            lines += [f"  hardware          {hw['name']}, {hw['utilization']:.0%} utilisation (estimated from FLOPs)",
                      f"  dense time        {_duration(self.dense_hours)} on one device",
                      f"  MST time          {_duration(self.mst_hours)} on one device ({speedup} realised with this library's kernels)",
                      f"  kernels           {hw['kernels']}"]
        lines.append(f"  dense to beat     a dense model of about {self.avg_active_params:,.0f} parameters trained on the same tokens "
                     "(MST's active parameters averaged over the run; sparse pre-training ends near it, Jin et al. 2025)")
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
    """Which measured config of the map this one is (ignoring ΔT), and a note."""
    neutral = dict(update_interval=None)
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


def regime_note(config: MSTConfig, tokens_per_param: float) -> str | None:
    """The note ``mstc train`` prints at start for a run below the tokens/param where the regime map
    found MST within 5% of dense (None when it is not, or when there is no map)."""
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
def _load(model):
    """(module, name, inputs(tokens), its model file or None) from a module, a model file (.py) or an HF config (.json)."""
    from torch import nn

    if isinstance(model, nn.Module):
        return model, type(model).__name__, lambda tokens: (tokens,), None
    path = Path(getattr(model, "path", model))
    if path.suffix == ".json":
        if not path.is_file():
            raise MstCompileError(f"HF config {path} does not exist: pass the path of a config.json")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        except Exception as e:  # noqa: BLE001 - any failure to build is the user's config: one line
            raise MstCompileError(f"cannot build a causal LM from {path}: {type(e).__name__}: {e}") from e
        return hf, str(path), lambda tokens: {"input_ids": tokens}, None
    from .modelfile import ModelFile, load_model_file

    mf = model if isinstance(model, ModelFile) else load_model_file(path)
    m = mf.model()
    return m, str(mf.path), mf.inputs_for(m), mf


def plan(model, tokens: int, *, config: MSTConfig | dict | None = None, block_size: int | None = None,
         batch_size: int = 16, hardware: str = "local", peak_flops: float | None = None,
         utilization: float | None = None, progress=None) -> TrainingPlan:
    """The FLOPs, time and expected quality gap of MST-training ``model`` on ``tokens`` tokens.

    ``model``: an ``nn.Module``, a model file (``model()``, as ``mstc train`` takes) or a Hugging Face
    ``config.json``. ``batch_size`` sequences of ``block_size`` tokens (default: the model's maximum
    length, else 128) make one optimizer step; the run's length is tokens / that.
    ``hardware``: ``"local"`` (this machine's GPU, else its CPU) or ``"cpu"`` time a dense step and
    an MST step per phase here and forecast from those; a GPU preset (``"a100"``, ``"h100"``,
    ``"h200"``, with ``peak_flops`` / ``utilization`` to override it) estimates from FLOPs.
    ``progress(message)`` hears about each stage (a large model takes minutes to capture and measure).
    """
    import torch

    from .api import as_config, sparsify
    from .capture import split_inputs
    from .errors import CaptureError
    from .modelfile import max_sequence_length, parameter_count
    from .runtime import schedule
    from .runtime.forecast import forecast
    from .runtime.schedule import Schedule

    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0 or not math.isfinite(tokens):
        raise ValueError(f"plan: tokens={tokens!r} is invalid: expected a positive number of training tokens")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"plan: batch_size={batch_size!r} is invalid: expected an integer >= 1")
    hw = _hardware(hardware, peak_flops, utilization)
    net, name, inputs, mf = _load(model)
    T = block_size or max_sequence_length(net) or 128
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"plan: block_size={T!r} is invalid: expected an integer >= 1")
    per_step = batch_size * T
    steps = max(1, round(tokens / per_step))
    cfg = as_config(config)
    run = Schedule(cfg, steps)  # checked before anything is captured
    ids = torch.zeros(1, T, dtype=torch.long)
    args, kwargs = split_inputs(inputs(ids))
    params = parameter_count(net)
    say = progress or (lambda message: None)
    say(f"capturing {name} ({params:,} parameters) ...")
    try:  # a model file is captured as mstc train captures it (its example_inputs(), if any)
        sm = sparsify(net, cfg, total_steps=steps, example_inputs=mf.capture_inputs(net, ids) if mf else inputs(ids))
    except CaptureError as e:
        raise (mf.capture_error(e) if mf else e) from None
    say(f"one forward at batch 1, T={T}, through the FLOP ledger's hooks ...")
    fp = sm.mst.footprint(*args, **kwargs)
    say(f"walking the schedule: {steps:,} steps ...")
    numel = {n: sw.numel for n, sw in sm.mst.sparse_weights().items()}
    fc = forecast(fp, run, sm.mst.allocation, sm.mst.units(), per_step, stride=cfg.stride)
    if hw is None:  # timed on this machine
        from . import timing

        device = torch.device("cuda" if hardware.lower() == "local" and torch.cuda.is_available() else "cpu")
        b = timing.timed_batch(batch_size, T)
        say(f"timing a dense step and an MST step per phase on this machine ({timing.describe(device)}) at batch {b}, T={T} ...")
        sites = list(sm.mst.attention_sites())
        states = {ph.phase: (max(0.0, 1.0 - ph.density), _patterns_at(run, sites, ph.first_step - 1 + ph.steps // 2, T))
                  for ph in fc.phases}  # each phase at its mean density, with the attention of its middle step
        times = timing.time_steps(net, sm, inputs, states, batch_size=batch_size, block_size=T, device=device)
        step_s = {state: times.step(state, batch_size) for state in ("dense", *states)}
        hardware_info = {"name": f"this machine ({times.device}), timed", "kind": device.type,
                         "measured": {**times.as_dict(), "step_s": step_s, "updates": len(schedule.update_steps(run))}}
        dense_hours = steps * step_s["dense"] / 3600.0
        mst_hours = sum(ph.steps * step_s[ph.phase] for ph in fc.phases) / 3600.0
    else:  # a GPU preset: masked dense GEMMs and HSA save no time there (yet)
        rate = hw.peak_flops * hw.utilization * 3600.0
        hardware_info = {"name": hw.name, "peak_flops": hw.peak_flops, "utilization": hw.utilization, "kind": "gpu",
                         "kernels": gpu_kernels(cfg.tile)}
        dense_hours = mst_hours = fc.dense_flops / rate
    gap, extrapolated, regime = expected_gap(cfg, steps * per_step / params)
    sparse = sum(numel.values())
    avg_density = sum(ph.density_steps for ph in fc.phases) / steps
    return TrainingPlan(
        model=name, params=params, tokens=steps * per_step, steps=steps, tokens_per_step=per_step, block_size=T,
        dense_flops=fc.dense_flops, mst_flops=fc.mst_flops, phases=[p.as_dict() for p in fc.phases], hardware=hardware_info,
        dense_hours=dense_hours, mst_hours=mst_hours, expected_gap=gap, extrapolated=extrapolated, regime=regime,
        config=cfg.to_dict(), avg_active_params=params - sparse + sparse * avg_density)


def _patterns_at(run, sites: list[str], step: int, T: int) -> dict[str, tuple[str, int]]:
    """{site: (pattern, stride)} the schedule ``run`` runs at ``step`` for sequences of length T."""
    from .ops.attention import effective_pattern
    from .runtime import schedule

    return {site: effective_pattern(pattern, run.config.stride, scale, T)
            for site, (pattern, scale) in ((site, schedule.site_pattern(site, step, run)) for site in sites)}


def _hardware(hardware: str, peak_flops: float | None, utilization: float | None) -> Hardware | None:
    """The GPU preset (with overrides), or None for hardware timed on this machine."""
    key = hardware.lower() if isinstance(hardware, str) else hardware
    if key in MEASURED:
        if peak_flops is not None or utilization is not None:
            raise ValueError(f"plan: hardware={hardware!r} is timed on this machine; peak_flops and utilization apply "
                             f"to the GPU presets ({', '.join(HARDWARE)})")
        return None
    if key not in HARDWARE:
        raise ValueError(f"plan: hardware={hardware!r} is unknown: expected one of {', '.join((*MEASURED, *HARDWARE))}")
    hw = HARDWARE[key]
    if peak_flops is not None:
        if not isinstance(peak_flops, (int, float)) or not peak_flops > 0:
            raise ValueError(f"plan: peak_flops={peak_flops!r} is invalid: expected FLOP/s > 0")
        hw = Hardware(f"{hw.name}, peak set to {peak_flops:.3g} FLOP/s", float(peak_flops), hw.utilization)
    if utilization is not None:
        if not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"plan: utilization={utilization!r} is invalid: expected a fraction in (0, 1]")
        hw = Hardware(hw.name, hw.peak_flops, float(utilization))
    return hw
