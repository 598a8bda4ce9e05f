"""``mst_compile.plan``: what an MST run will cost and save, before it runs.

The FLOPs are the runtime ledger's own count: the model is captured and sparsified as for training,
one forward at batch 1 shows the ledger's hooks its footprint (rows per sparse weight, attention
calls, dense work), and ``runtime/forecast.py`` walks the schedule with the ledger's per-step
formula. So the plan of a run equals the ledger total of that run (tests check it).

Hours on this machine (``hardware="local"`` or ``"cpu"``) come from measured step times
(``timing.py``): a dense training step and an MST step in each phase's state, times the steps. Hours
on a GPU preset are estimates: FLOPs divided by its peak bf16 FLOP/s times an assumed utilisation;
there the MST run is counted at the dense run's time, an optimistic bound: on an H200 the tile
kernels and HSA were measured slower than cuBLAS and flash attention end to end, and the plan's
``kernels`` line says so. The expected quality gap is read off
the regime map (``regime.py``); ``plan_report.py`` prints the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import MSTConfig
from .plan_report import TrainingPlan
from .regime import expected_gap


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
    linear = ("tile-sparse linears (Triton) measured slower than cuBLAS end to end on an H200" if tile else
              "sparse linears run as masked dense GEMMs (no faster than dense)")
    return (f"{linear}; HSA measured 0.13-0.62x flash attention; counted at dense speed, which is optimistic: "
            "the compiled GPT-2-small MST ultra step ran at 0.35-0.41x dense on an H200 (benchmarks/results/gpu/h200.md)")


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
    from .modelfile import build_model, max_sequence_length, parameter_count
    from .runtime import schedule
    from .runtime.forecast import forecast
    from .runtime.schedule import Schedule

    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0 or not math.isfinite(tokens):
        raise ValueError(f"plan: tokens={tokens!r} is invalid: expected a positive number of training tokens")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"plan: batch_size={batch_size!r} is invalid: expected an integer >= 1")
    hw = _hardware(hardware, peak_flops, utilization)
    net, name, inputs, mf = build_model(model)
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
    sites = list(sm.mst.attention_modules())  # in model order: what MSTConfig.attention_depth counts
    fc = forecast(fp, run, sm.mst.allocation, sm.mst.units(), per_step, stride=cfg.stride, order=sites)
    if hw is None:  # timed on this machine
        from . import timing

        device = torch.device("cuda" if hardware.lower() == "local" and torch.cuda.is_available() else "cpu")
        b = timing.timed_batch(batch_size, T)
        say(f"timing a dense step and an MST step per phase on this machine ({timing.describe(device)}) at batch {b}, T={T} ...")
        states = {ph.phase: (max(0.0, 1.0 - ph.density), _patterns_at(run, sites, ph.first_step - 1 + ph.steps // 2, T))
                  for ph in fc.phases}  # each phase at its mean density, with the attention of its middle step
        times = timing.time_steps(net, sm, inputs, states, batch_size=batch_size, block_size=T, device=device)
        step_s = {state: times.step(state, batch_size) for state in ("dense", *states)}
        hardware_info = {"name": f"this machine ({times.device}), timed", "kind": device.type,
                         "measured": {**times.as_dict(), "step_s": step_s, "updates": len(schedule.update_steps(run))}}
        dense_hours = steps * step_s["dense"] / 3600.0
        mst_hours = sum(ph.steps * step_s[ph.phase] for ph in fc.phases) / 3600.0
    else:  # a GPU preset: MST's kernels save no time there (measured slower on an H200); counted at dense speed
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
            for site, (pattern, scale) in ((site, schedule.site_pattern(site, step, run, sites)) for site in sites)}


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
