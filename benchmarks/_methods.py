"""The methods of the reproduction, each as (dense?, MSTConfig changes) over the MST defaults.

Every method trains the same model with the same seed, data order, optimizer and learning-rate curve
(the trainer's ``--lr-schedule``, the same for dense and sparse runs; reproduce.py passes it to every
run); only what MST does to the weights and the attention differs, and each method may have its own
peak learning rate (``--lr-of``, tuned by ``fair.py tune``). ``MSTConfig`` defaults are docs/design.md §3-5
(85% sparse from step 0 until 80% of the run, restoration to 50%, the LR curve times density^-0.5,
Mixed-Growing 3:1, HSA in the first half of the blocks in every phase); ``mst_v0`` is the first defaults
(a dense warm-up ramping to 85% over the first 10%, the LR curve as is, HSA in every block), which every
MST variant below builds on; the baselines switch parts of MST off:

- static / SET / RigL are weight-sparsity methods from the literature: sparse from step 0 at a
  constant 90% (ER), one cosine-annealed drop fraction over the whole run (``warmup_end=0,
  ultra_end=1`` makes the run one phase) and dense attention, as they were published.
- the MST ablations keep every first default (``mst_v0``) except the one part they remove.
- dense at equal FLOPs is the dense model for as many steps as MST's ledger total buys, with its
  own warm-up and learning-rate curve fitted to that shorter run (its step count is known once MST has run).
- the compute-fair baselines, sized once MST has run (``_frontier.py``): static sparse training at
  the sparsity whose FLOPs equal MST's, and smaller dense models (narrower; half as deep) trained
  for all the steps on MST's FLOP budget: what a user with MST's budget would otherwise train; and the
  dense model whose parameter count is MST's average active parameter count over the run (Jin et al.
  2025, arXiv 2501.12486: sparse pre-training ends where the dense model of that average size ends).
- the paper preset is the published recipe (``MSTConfig.preset("paper")``); the defaults are this
  library's (docs/design.md says why they differ).

ΔT: the paper preset and the SET/RigL baselines update every steps/30 steps (100 at 3000 steps, the
published interval); the MST defaults use their own run-length rule (``Schedule.interval``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mst_compile import MSTConfig
from mst_compile.config import ABLATION_KEYS, KEYS, PRESETS

_SCALED = "steps/30"  # an update_interval that follows the run length like the published recipe
_CONSTANT_90 = {"sparsity": 0.9, "warmup_end": 0.0, "ultra_end": 1.0, "attention": "dense", "attention_phases": ("ultra",),
                "update_interval": _SCALED, "lr_density_power": 0.0, "attention_depth": 1.0}
# the defaults before the fair comparison (dense warm-up over the first 10%, the LR curve as is, HSA in every block):
# every MST variant below was measured on top of them, so each keeps them and its result files still reproduce
_V0 = {"warmup_end": 0.1, "lr_density_power": 0.0, "attention_depth": 1.0}
_PAPER = {**PRESETS["paper"], "update_interval": _SCALED}


@dataclass(frozen=True)
class Method:
    key: str  # short id used for run folders and JSON
    label: str  # what the table calls it
    dense: bool = False
    mst: dict[str, Any] = field(default_factory=dict)  # MSTConfig overrides
    note: str = ""


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("dense", "dense (baseline)", dense=True, note="same formula at density 1, dense causal attention"),
    Method("static", "static sparse 90% ER", mst={**_CONSTANT_90, "drop_fraction": 0.0},
           note="masks fixed at step 0, never updated"),
    Method("set", "SET 90%", mst={**_CONSTANT_90, "grow_gradient_fraction": 0.0}, note="random growth"),
    Method("rigl", "RigL 90%", mst={**_CONSTANT_90, "grow_gradient_fraction": 1.0}, note="gradient growth"),
    Method("mst", "MST (defaults)", note="this library's defaults (MSTConfig())"),
    Method("mst_v0", "MST (first defaults)", mst=_V0,
           note="the defaults before the fair comparison: dense warm-up, the LR curve as is, HSA in every block"),
    Method("paper", "MST (paper preset)", mst=_PAPER, note="MSTConfig.preset('paper'): the published recipe"),
    Method("mst_no_sv", "MST w/o sparsity variation", mst={**_V0, "schedule": "constant"},
           note="constant 90% from step 0; phases still switch HSA and the drop fraction"),
    Method("mst_no_hsa", "MST w/o HSA", mst={**_V0, "attention": "dense"}, note="dense causal attention throughout"),
    Method("mst_lrd1", "MST, LR x 1/density", mst={**_V0, "lr_density_power": 1.0},
           note="the learning rate follows the density: the curve times (1/density)"),
    Method("mst_lrd05", "MST, LR x density^-0.5", mst={**_V0, "lr_density_power": 0.5},
           note="the learning rate follows the density: the curve times (1/density)^0.5"),
    Method("mst_lrd05_z01", "MST, LR x density^-0.5, ultra drop 0.1",
           mst={**_V0, "lr_density_power": 0.5, "drop_fraction": (0.3, 0.1, 0.0)},
           note="as density^-0.5, with a third of the topology churn in the ultra phase"),
    Method("mst_lrd05_z0", "MST, LR x density^-0.5, fixed ultra masks",
           mst={**_V0, "lr_density_power": 0.5, "drop_fraction": (0.3, 0.0, 0.0)},
           note="as density^-0.5, masks fixed from the end of the warm-up to restoration, which only grows"),
    Method("mst_lrd05_norest", "MST, LR x density^-0.5, no restoration",
           mst={**_V0, "lr_density_power": 0.5, "sparsity": 0.83, "final_sparsity": 0.83},
           note="as density^-0.5, ultra density to the end at 83% (the FLOPs of the defaults' restoration moved into it)"),
    Method("mst_lrd05_w0", "MST, LR x density^-0.5, sparse from step 0",
           mst={**_V0, "lr_density_power": 0.5, "warmup_end": 0.0, "sparsity": 0.82},
           note="as density^-0.5 without the dense warm-up: 82% from step 0 (the warm-up's FLOPs moved into the ultra phase)"),
    Method("mst_lrd05w_w0", "MST, each weight's LR x its density^-0.5, sparse from step 0",
           mst={**_V0, "lr_density_power": 0.5, "lr_density_scope": "weight", "warmup_end": 0.0, "sparsity": 0.82},
           note="as the sparse-from-step-0 variant with each sparse weight's learning rate following its own density "
                "(other parameters keep the curve)"),
    Method("mst_lrd05_w0_norest", "MST, LR x density^-0.5, sparse from step 0, no restoration",
           mst={**_V0, "lr_density_power": 0.5, "warmup_end": 0.0, "sparsity": 0.8, "final_sparsity": 0.8},
           note="as the sparse-from-step-0 variant at 80% to the end (the FLOPs of the warm-up and the restoration "
                "moved into the one sparse phase)"),
    Method("mst_lrd05_w0_fixed", "MST, LR x density^-0.5, sparse from step 0, fixed masks",
           mst={**_V0, "lr_density_power": 0.5, "warmup_end": 0.0, "sparsity": 0.8, "final_sparsity": 0.8,
                "drop_fraction": (0.0, 0.0, 0.0)},
           note="as the sparse-from-step-0 variant without restoration and without topology updates: ER masks fixed "
                "at step 0, 80% to the end, HSA throughout (static sparsity that spends HSA's savings on weights)"),
    Method("mst_lrd05_w0_dattn", "MST, LR x density^-0.5, sparse from step 0, no restoration, dense attention",
           mst={**_V0, "lr_density_power": 0.5, "warmup_end": 0.0, "sparsity": 0.857, "final_sparsity": 0.857,
                "attention": "dense"},
           note="as the sparse-from-step-0 variant without restoration, with dense causal attention: HSA's savings "
                "given back to the weights' budget (85.7% to the end, topology updates kept)"),
    Method("mst_dattn", "MST, dense attention at equal FLOPs", mst={**_V0, "attention": "dense", "sparsity": 0.914},
           note="the defaults with dense causal attention and the ultra sparsity raised to 91.4% to keep their FLOPs "
                "(HSA's ablation at equal FLOPs)"),
    *(Method(f"mst_hsa_{where}", f"MST, HSA in the {where} two layers only, at equal FLOPs",
             mst={**_V0, "attention_sites": {f"h.[{dense}].attn": "dense"}, "sparsity": 0.882},
             note=f"the defaults with dense causal attention in the {other} two blocks and HSA in the {where} two, the "
                  f"ultra sparsity raised to 88.2% to keep their FLOPs (HSA per layer)")
      for where, other, dense in (("lower", "upper", "23"), ("upper", "lower", "01"))),
    Method("mst_hsa_lower_lrd05_w0", "MST, HSA in the lower two layers only, LR x density^-0.5, sparse from step 0",
           mst={**_V0, "attention_sites": {"h.[23].attn": "dense"}, "lr_density_power": 0.5, "warmup_end": 0.0,
                "sparsity": 0.85},
           note="the lower-blocks HSA split with the sparse-from-step-0 recipe: 85% from step 0 to keep the defaults' "
                "FLOPs, restoration kept (on this 4-block model the glob is attention_depth=0.5)"),
    Method("mst_lrd075_w0", "MST, LR x density^-0.75, sparse from step 0",
           mst={**_V0, "lr_density_power": 0.75, "warmup_end": 0.0, "sparsity": 0.82},
           note="as the sparse-from-step-0 variant with the learning rate following density more steeply"),
    Method("mst_lrd05_w05", "MST, LR x density^-0.5, 5% warm-up",
           mst={**_V0, "lr_density_power": 0.5, "warmup_end": 0.05, "sparsity": 0.835},
           note="as density^-0.5 with half the dense warm-up: 83.5% ultra (the other half's FLOPs moved into it)"),
    *(Method(f"mst_tile{b}", f"MST, {b}x{b} tiles", mst={**_V0, "tile": b},
             note=f"the defaults with every mask constant on {b}x{b} tiles (the blocked kernel where it pays)")
      for b in (16, 32, 64)),
    Method("mst_grad_grow", "MST, gradient-only growth", mst={**_V0, "grow_gradient_fraction": 1.0},
           note="RigL growth instead of Mixed-Growing"),
    Method("dense_eq", "dense at equal FLOPs", dense=True, note="fewer steps: MST's FLOP budget, LR schedule fitted"),
    Method("static_eq", "static sparse at MST's FLOPs", mst={**_CONSTANT_90, "drop_fraction": 0.0},
           note="sparsity solved so its FLOPs equal MST's"),
    Method("dense_narrow", "smaller dense, narrower", dense=True, note="same depth, width sized to MST's FLOPs"),
    Method("dense_shallow", "smaller dense, half depth", dense=True, note="half the blocks, width sized to MST's FLOPs"),
    Method("dense_avg", "dense of MST's average size", dense=True,
           note="same depth, parameters = MST's average active parameters over the run (Jin et al. 2025)"),
)}

# sized from MST's (predicted) result
AFTER_MST = ("dense_eq", "static_eq", "dense_narrow", "dense_shallow", "dense_avg")

# what reproduce.py trains by default (the first defaults too: the ablations mst_no_sv, mst_no_hsa and mst_grad_grow
# are of them); the variants (a learning rate that follows density, tiles, dense attention, HSA per layer) run by name
VARIANTS = ("mst_lrd1", "mst_lrd05", "mst_lrd05_z01", "mst_lrd05_z0", "mst_lrd05_norest",
            "mst_lrd05_w0", "mst_lrd05w_w0", "mst_lrd05_w0_norest", "mst_lrd05_w0_fixed", "mst_lrd05_w0_dattn",
            "mst_dattn", "mst_hsa_lower", "mst_hsa_upper", "mst_hsa_lower_lrd05_w0", "mst_lrd075_w0",
            "mst_lrd05_w05", "mst_tile16", "mst_tile32", "mst_tile64")
ORDER = tuple(m for m in METHODS if m not in VARIANTS)


def mst_config(method: Method, steps: int, update_interval: int | None,
               overrides: dict[str, Any] | None = None, sized: dict[str, Any] | None = None) -> MSTConfig:
    """The MSTConfig of ``method`` for a run of ``steps`` (the trainer passes the run's length and seed).
    ``update_interval`` (when not None) replaces every method's ΔT; ``overrides`` apply to the MST runs;
    ``sized`` holds what was solved from MST's run."""
    cfg: dict[str, Any] = {}
    if not method.dense:
        if method.key in ("mst", "paper") or method.key.startswith("mst_"):
            cfg.update(overrides or {})
        cfg.update(method.mst)
        cfg.update(sized or {})
        if cfg.get("schedule") == "constant":  # held at the ultra level (s_max) from step 0 to the end
            cfg["schedule"] = [(0, float(cfg.get("sparsity", MSTConfig.sparsity)))]
        if cfg.get("update_interval") == _SCALED:
            cfg["update_interval"] = max(1, round(steps / 30))
        if update_interval is not None:
            cfg["update_interval"] = update_interval
    return MSTConfig(**cfg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs for MSTConfig and Ablation fields (numbers, names, or comma lists for drop_fraction)."""
    out: dict[str, Any] = {}
    known = (set(KEYS) | set(ABLATION_KEYS)) - {"ablation"}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        if key == "drop_fraction":
            zs = [float(z) for z in text.split(",")]
            out[key] = zs[0] if len(zs) == 1 else tuple(zs)
        elif key == "attention_phases":
            out[key] = tuple(p.strip() for p in text.split(",") if p.strip())
        elif key == "schedule":
            out[key] = [(int(s), float(v)) for s, v in (p.split(":") for p in text.split(","))]
        else:
            try:
                out[key] = int(text) if text.lstrip("-").isdigit() else float(text)
            except ValueError:
                out[key] = None if text.lower() == "none" else text
        if key in ABLATION_KEYS:
            out.setdefault("ablation", {})[key] = out.pop(key)
    MSTConfig(**out)  # validate now, not in a worker halfway through the benchmark
    return out
