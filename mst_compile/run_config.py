"""The run's own configuration: ``TrainConfig`` (every knob of a run that is not MST itself) and the
TOML a run folder keeps it in (``config.toml``: the model file, ``[train]`` and ``[mst]``).

Training writes it and resume, export and report read it, so it lives below both ``train`` and
``export``. Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from .config import MSTConfig
from .constants import DEFAULT_LR_DECAY, LR_SCHEDULES
from .errors import MstCompileError

CONFIG = "config.toml"  # the file of a run folder this module reads and writes

PRECISIONS = ("fp32", "bf16", "fp16")
DATA_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")  # --data-dtype: how raw token-id files are stored


@dataclass
class TrainConfig:
    """Everything about a training run that is not MST itself."""

    steps: int | None = None  # optimizer steps; None: the MST config's total_steps
    batch_size: int = 16  # sequences per micro-batch per process
    block_size: int | None = None  # tokens per sequence; None: the model's block_size (else 128)
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # end of the decay; None: lr / 10
    warmup_steps: int | None = None  # linear lr warm-up; None: 5% of steps
    # the learning-rate curve of every run, dense or sparse (runtime/schedule.lr_multiplier): "wsd" is flat,
    # then a cosine over the last lr_decay of the run (None: MST's restoration phase, 1 - ultra_end); "cosine"
    # decays over the whole run
    lr_schedule: str = "wsd"
    lr_decay: float | None = None
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices (not on biases or norms)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_interval: int | None = None  # steps between evaluations; None: steps / 5
    eval_iters: int = 10  # batches per split per evaluation
    log_interval: int = 10  # steps between metrics.jsonl lines (progress updates every step)
    checkpoint_interval: int | None = None  # steps between checkpoints; None: eval_interval
    keep_checkpoints: int = 2  # newest checkpoints kept (step-N.pt); >= 2 so a corrupt one has a predecessor
    seed: int = 0  # model init, batch order and MST's random growth
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, fp32 master weights; fp16 with a grad scaler)
    data: str | None = None  # text, token ids or records (README: Data); None: the Python standard library
    tokenizer: str | None = None  # local Hugging Face tokenizer folder; None: bytes (vocab 256)
    data_dtype: str | None = None  # raw token-id files (.bin); None: uint16, as nanoGPT writes them
    text_field: str | None = None  # the text column of records; None: "text"
    val_fraction: float = 0.05
    dense: bool = False  # the dense baseline: same run without sparsity
    # steps the MST and learning-rate schedules span; None: steps. A resume with a longer --steps keeps
    # the original span and trains the extra steps in the final phase at min_lr (docs: Resuming).
    schedule_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "block_size", "warmup_steps", "eval_interval", "checkpoint_interval", "schedule_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1)):
                _fail(name, v, "an integer >= 1" if name != "warmup_steps" else "an integer >= 0")
        for name in ("batch_size", "grad_accum", "eval_iters", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "an integer >= 1")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 2:
            _fail("keep_checkpoints", self.keep_checkpoints, "an integer >= 2")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                _fail(name, v, "a number > 0" if name == "lr" else "a number >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            _fail("lr_schedule", self.lr_schedule, " or ".join(LR_SCHEDULES))
        if self.lr_decay is not None and (isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, (int, float))
                                          or not 0 < self.lr_decay <= 1):
            _fail("lr_decay", self.lr_decay, "a fraction of the run in (0, 1]")
        if self.min_lr is not None and (not isinstance(self.min_lr, (int, float)) or not 0 <= self.min_lr <= self.lr):
            _fail("min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                _fail(name, v, "a number in [0, 1)")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            _fail("val_fraction", self.val_fraction, "a number in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _fail("seed", self.seed, "an integer")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail("device", self.device, "auto, cpu, cuda or cuda:N")
        if self.precision not in PRECISIONS:
            _fail("precision", self.precision, " or ".join(PRECISIONS))
        if self.data_dtype is not None and self.data_dtype not in DATA_DTYPES:
            _fail("data_dtype", self.data_dtype, ", ".join(DATA_DTYPES))
        if self.text_field is not None and (not isinstance(self.text_field, str) or not self.text_field):
            _fail("text_field", self.text_field, "a column name")
        if not isinstance(self.dense, bool):
            _fail("dense", self.dense, "true or false")
        if self.schedule_steps is not None and self.steps is not None and self.schedule_steps > self.steps:
            _fail("schedule_steps", self.schedule_steps, f"at most steps={self.steps}")

    def resolved(self, mst: MSTConfig, model_block_size: int | None = None) -> TrainConfig:
        """Fill every None with its rule (the saved config has concrete numbers only)."""
        steps = self.steps or mst.total_steps
        block = self.block_size or model_block_size or 128
        ev = self.eval_interval or max(1, steps // 5)
        return dataclasses.replace(
            self, steps=steps, block_size=block, eval_interval=ev, schedule_steps=self.schedule_steps or steps,
            min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
            warmup_steps=max(1, (self.schedule_steps or steps) // 20) if self.warmup_steps is None else self.warmup_steps,
            checkpoint_interval=self.checkpoint_interval or ev,
            lr_decay=self.lr_decay or (round(1.0 - mst.ultra_end, 12) if mst.ultra_end < 1 else DEFAULT_LR_DECAY),
        )


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected {allowed}")


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
MST_KEYS = tuple(f.name for f in dataclasses.fields(MSTConfig))


# -- TOML in and out -------------------------------------------------------------------------
def read_config_file(path: str | Path) -> tuple[dict, dict]:
    """Read ``[train]`` and ``[mst]`` tables (top-level keys go to whichever knows them).

    Returns ``(train_overrides, mst_overrides)``; unknown keys are one readable error.
    """
    p = Path(path)
    if not p.is_file():
        raise MstCompileError(f"config file {p} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MstCompileError(f"config file {p} is not valid TOML: {e}") from None
    train, mst = {}, {}
    for key, value in doc.items():
        if key in ("train", "mst") and isinstance(value, dict):
            allowed = TRAIN_KEYS if key == "train" else MST_KEYS + ("steps", "lr_schedule")
            bad = sorted(set(value) - set(allowed))
            if bad:
                raise MstCompileError(f"config file {p}: unknown key(s) {bad} in [{key}]; allowed: {', '.join(sorted(allowed))}")
            (train if key == "train" else mst).update(value)
        elif key in TRAIN_KEYS:
            train[key] = value
        elif key in MST_KEYS:
            mst[key] = value
        elif key not in ("model", "model_sha256"):  # the saved config names its model file; informational
            raise MstCompileError(
                f"config file {p}: unknown key {key!r}; use [train] keys ({', '.join(TRAIN_KEYS)}) "
                f"or [mst] keys ({', '.join(MST_KEYS)})"
            )
    fold_steps(train, mst)
    return train, mst


def read_model_record(run_dir: str | Path) -> dict:
    """``{"model": path, "model_sha256": hash}`` as the run's config.toml recorded them (either may be absent)."""
    doc = tomllib.loads((Path(run_dir) / CONFIG).read_text())
    return {k: doc[k] for k in ("model", "model_sha256") if k in doc}


def fold_steps(train: dict, mst: dict) -> None:
    """``steps`` and ``total_steps`` are one knob: the run's length is the MST schedule's length."""
    if "steps" in mst:
        train.setdefault("steps", mst.pop("steps"))
    if "total_steps" in mst:
        train.setdefault("steps", mst.pop("total_steps"))
    if "seed" in mst:  # one seed drives init, data order and random growth
        train.setdefault("seed", mst.pop("seed"))
    if "lr_schedule" in mst:  # the learning rate is the trainer's (run folders written before it moved keep it in [mst])
        train.setdefault("lr_schedule", mst.pop("lr_schedule"))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table, keys quoted (site globs hold dots and stars)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_config(train: TrainConfig, mst: MSTConfig, model: str | None = None, model_sha256: str | None = None) -> str:
    """The resolved config as TOML (None values are left out: they mean "the default")."""
    lines = [f"model = {_toml_value(model)}"] if model else []
    lines += [f"model_sha256 = {_toml_value(model_sha256)}"] if model_sha256 else []
    lines += [""] if lines else []
    for table, d in (("train", dataclasses.asdict(train)), ("mst", mst.to_dict())):
        extra = d.pop("extra", None)
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
        if extra:
            lines.append(f"\n[{table}.extra]")
            lines += [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in extra.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
