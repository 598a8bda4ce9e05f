"""The run folder ``mstc train`` writes: its file names, where each file lives, and reading its config.

Training writes the folder; resume, ``mstc export`` and ``mstc report`` read it. Each name is
spelled here once, so a renamed file cannot leave one reader behind. Layout::

    <run>/config.toml            the model file (path, sha256) and the resolved [train] / [mst] tables
    <run>/metrics.jsonl          one JSON line per logged step, evaluation and topology update
    <run>/summary.json           the final summary (losses, FLOPs, densities)
    <run>/tensorboard/           the same scalars for TensorBoard (when installed)
    <run>/checkpoints/           step-N.pt, last.pt, best.pt and sha256sums (mst_compile.checkpoint)
    <run>/model.onnx             what mstc export writes by default
    <run>/report/report.md       what mstc report writes for this run (with its plots)

Importing this module does not import torch.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import tomllib

from .config import MSTConfig
from .errors import MstCompileError
from .run_config import CONFIG, TrainConfig, read_config_file

RUNS = "runs"  # where new run folders go, relative to the current folder
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
ONNX = "model.onnx"
REPORT_DIR = "report"  # what mstc report writes for one run: plots and REPORT
REPORT = "report.md"

__all__ = ["BEST", "CHECKPOINTS", "CONFIG", "LAST", "METRICS", "ONNX", "REPORT", "REPORT_DIR", "RUNS", "SUMMARY", "TENSORBOARD",
           "checkpoints", "config_file", "existing", "last_checkpoint", "load_run_config"]


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | Path) -> Path:
    return checkpoints(run_dir) / LAST


def existing(run_dir: str | Path) -> Path:
    """A folder ``mstc train`` wrote, with a checkpoint: it has ``config.toml`` and ``checkpoints/last.pt``."""
    p = Path(run_dir)
    if not p.is_dir():
        raise MstCompileError(f"run folder {p} does not exist: pass the folder mstc train wrote ({RUNS}/...)")
    if not config_file(p).is_file():
        raise MstCompileError(f"{p} is not a run folder (no {CONFIG}): pass the folder mstc train wrote")
    last = last_checkpoint(p)
    if not last.is_file():
        raise MstCompileError(f"run folder {p} has no checkpoint ({last} is missing): the run stopped before its first "
                              f"checkpoint, so there is nothing to export or resume; {_restart_advice(p)}")
    return p


def _restart_advice(run_dir: Path) -> str:
    """How to run again a run that stopped before its first checkpoint: the same model file and settings."""
    try:
        model = tomllib.loads(config_file(run_dir).read_text()).get("model") or "MODEL"
    except (OSError, tomllib.TOMLDecodeError):
        model = "MODEL"
    return (f"start it again with its settings: mstc train {shlex.quote(str(model))} "
            f"--config {shlex.quote(str(config_file(run_dir)))} --out NEW_RUN_DIR")


def load_run_config(run_dir: str | Path) -> tuple[TrainConfig, MSTConfig]:
    """The run's ``(TrainConfig, MSTConfig)`` as saved (the MST schedule spans ``schedule_steps``)."""
    if not config_file(run_dir).is_file():
        raise MstCompileError(f"--resume {run_dir}: not a run folder (no {CONFIG}); pass the folder mstc train wrote")
    train, mst = read_config_file(config_file(run_dir))
    tc = TrainConfig(**train)
    return tc, MSTConfig.from_dict(mst)
