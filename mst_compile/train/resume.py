"""What ``mstc train MODEL --resume RUN`` may change about a run, and what it refuses.

The run's saved config.toml is the base. Flags (and ``--config``) that repeat its values are
accepted as they are, so the original command line can simply be run again with ``--resume``.
A resume may change:

- ``--lr`` (e.g. lower after a NaN): the learning-rate schedule keeps its shape; ``min_lr`` scales
  with it unless ``--min-lr`` is given too;
- ``--min-lr``;
- ``--steps``, to a longer run: the MST and learning-rate schedules keep their original span
  (``schedule_steps``) and the extra steps train in the final phase (final sparsity, final attention
  pattern, ``min_lr``, no further topology updates). Stretching the schedule instead would move the
  phase boundaries under steps already taken: a run resumed in restoration would jump back into
  ultra-sparsification and lose 40% of its weights in one update, and the learning rate would jump;
- how the run reports: ``--log-interval``, ``--eval-interval``, ``--eval-iters``, ``--checkpoint-interval``;
- ``--fsdp``: how the processes hold the model, not what it trains (a run's checkpoints are whole either way).

Anything else changes what is trained and is refused, naming every difference.
"""
from __future__ import annotations

import dataclasses

from ..config import MSTConfig
from ..errors import MstCompileError
from .options import TrainConfig, build_configs

REPORTING = ("log_interval", "eval_interval", "eval_iters", "checkpoint_interval")
LAYOUT = ("fsdp",)  # sharded or replicated: the checkpoints are the same whole files


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_configs(run_dir, saved: tuple[TrainConfig, MSTConfig], config_file: str | None,
                   train_flags: dict, mst_flags: dict) -> tuple[TrainConfig, MSTConfig, list[str]]:
    """Apply a resume's flags to the saved configs; returns ``(train, mst, changes)`` or refuses."""
    old_tc, old_mst = saved
    if train_flags.get("steps", old_tc.steps) < old_tc.steps:
        raise MstCompileError(f"--resume {run_dir}: --steps {train_flags['steps']} is shorter than the run's {old_tc.steps} "
                              "steps; a resume may only lengthen a run")
    base_train = dataclasses.asdict(old_tc)
    if "lr" in train_flags and "min_lr" not in train_flags and old_tc.min_lr is not None:
        base_train["min_lr"] = old_tc.min_lr * train_flags["lr"] / old_tc.lr  # the decay keeps its shape
    new_tc, new_mst = build_configs(old_mst, base_train, config_file, dict(train_flags), dict(mst_flags))
    old_d, new_d = dataclasses.asdict(old_tc), dataclasses.asdict(new_tc)
    refused, changes = [], []
    for key in old_d:
        if old_d[key] == new_d[key]:
            continue
        was, now = old_d[key], new_d[key]
        if key in ("steps", "lr", "min_lr") or key in REPORTING or key in LAYOUT:
            changes.append(f"{_flag(key)} {was} -> {now}")
        else:
            refused.append(f"{_flag(key)} {now} (the run has {was})")
    old_m, new_m = old_mst.to_dict(), new_mst.to_dict()
    old_m.update(old_m.pop("ablation"))
    new_m.update(new_m.pop("ablation"))
    refused += [f"{_flag(k)} {new_m[k]} (the run has {v})" for k, v in old_m.items() if new_m[k] != v]
    if refused:
        raise MstCompileError(
            f"--resume {run_dir}: these change the run: {'; '.join(refused)}. A resume may change only --lr, --min-lr, "
            "a longer --steps, --fsdp and the log/eval/checkpoint intervals; start a new run (--out) for the rest")
    # a longer run keeps the schedules' span (runs saved before schedule_steps existed: their steps)
    tc = dataclasses.replace(new_tc, schedule_steps=old_tc.schedule_steps or old_tc.steps)
    return tc, old_mst, changes
