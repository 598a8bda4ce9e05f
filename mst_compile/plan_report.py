"""What ``mstc plan`` prints: the ``TrainingPlan`` that ``planning.plan`` returns, as text (``render``)
and as its ``--json`` (``as_dict``)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from .regime import versus_text


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
        width = (self.avg_active_params / self.params) ** 0.5 if self.params else 1.0
        r = self.regime
        vs = r.get("vs_dense_avg")
        said = "on the same tokens: MST's average active parameter count, where sparse pre-training ends (Jin et al. 2025). "
        if vs is None:  # no measured point for this config: the README's fair comparison
            said += ("In this project's fair benchmark that model ended below MST (README, \"Measured results\"): train it "
                     "instead unless your own comparison says otherwise.")
        else:
            said += f"Measured: {versus_text(vs)}."
            if vs["verdict"] == "above":
                said += " Train it instead unless your own comparison says otherwise."
        lines += [f"  dense to beat     a dense model of about {self.avg_active_params:,.0f} parameters (e.g. the same depth at {width:.2f}x the width)",
                  *textwrap.wrap(said, 112, initial_indent=" " * 20, subsequent_indent=" " * 20)]
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
