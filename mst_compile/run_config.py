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

from .config import ABLATION_KEYS, GONE, KEYS, MSTConfig
from .constants import DEFAULT_LR_DECAY, LR_SCHEDULES
from .errors import MstCompileError
from .fields import Bad, Choice, Flag, Integer, Kind, Number, Optional, Text, fail, knob, validate

CONFIG = "config.toml"  # the file of a run folder this module reads and writes

PRECISIONS = ("fp32", "bf16", "fp16")
DATA_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")  # --data-dtype: how raw token-id files are stored


class _Device(Kind):
    expected = "auto, cpu, cuda or cuda:N"

    def norm(self, v):
        if not isinstance(v, str) or not (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")):
            raise Bad
        return v


_GE1 = Integer(1)
_OPT_GE1 = Optional(Integer(1), "an integer >= 1")


@dataclass
class TrainConfig:
    """Everything about a training run that is not MST's recipe: among it the run's length and seed,
    which the trainer passes to ``sparsify`` (``total_steps``: ``schedule_steps``, ``seed``)."""

    steps: int = knob(1000, _GE1, "Optimizer steps; the MST schedule spans them.", flags=("--steps", "--total-steps"))
    batch_size: int = knob(16, _GE1, "Sequences per micro-batch per process.")
    block_size: int | None = knob(None, _OPT_GE1, "Tokens per sequence.", means="the model's block_size, else 128")
    lr: float = knob(1e-3, Number(0, None, "a number > 0", lo_open=True), "Peak learning rate.")
    min_lr: float | None = knob(None, Optional(Number(0, None, "a number >= 0"), "a number >= 0"),
                                "Learning rate at the end of the decay.", means="lr/10")
    warmup_steps: int | None = knob(None, Optional(Integer(0), "an integer >= 0"), "Linear learning-rate warm-up steps.",
                                    means="5% of steps")
    # the learning-rate curve of every run, dense or sparse (runtime/schedule.lr_multiplier)
    lr_schedule: str = knob("wsd", Choice(LR_SCHEDULES, " or ".join(LR_SCHEDULES)),
                            "Learning-rate curve of every run, dense or MST: wsd (flat, then a cosine decay over the last "
                            "--lr-decay of the run) or cosine (over the whole run).")
    lr_decay: float | None = knob(None, Optional(Number(0, 1, "", lo_open=True), "a fraction of the run in (0, 1]"),
                                  "WSD: fraction of the run the learning rate decays over.",
                                  means="the restoration phase, 1 - ultra_end; 0.2 without one")
    weight_decay: float = knob(0.1, Number(0, None, "a number >= 0"), "AdamW weight decay on matrices.")
    beta1: float = knob(0.9, Number(0, 1, "a number in [0, 1)", hi_open=True), "AdamW beta1.")
    beta2: float = knob(0.95, Number(0, 1, "a number in [0, 1)", hi_open=True), "AdamW beta2.")
    grad_clip: float = knob(1.0, Number(0, None, "a number >= 0"), "Clip the global gradient norm (0: off).")
    grad_accum: int = knob(1, _GE1, "Micro-batches per optimizer step.")
    eval_interval: int | None = knob(None, _OPT_GE1, "Steps between evaluations.", means="steps/5")
    eval_iters: int = knob(10, _GE1, "Batches per split per evaluation.")
    log_interval: int = knob(10, _GE1, "Steps between metrics.jsonl lines.")
    checkpoint_interval: int | None = knob(None, _OPT_GE1, "Steps between checkpoints.", means="the eval interval")
    keep_checkpoints: int = knob(2, Integer(2), "Newest checkpoints kept in the run folder (at least 2).")
    seed: int = knob(0, Integer(None), "Seed of model init, batch order and random growth.")
    device: str = knob("auto", _Device(), "auto, cpu, cuda or cuda:N.")
    precision: str = knob("fp32", Choice(PRECISIONS, " or ".join(PRECISIONS)),
                          "fp32, bf16 (autocast) or fp16 (autocast and a grad scaler); weights stay fp32.")
    data: str | None = knob(None, Optional(Text(), "a path"),
                            "Text file, folder or quoted glob; token ids (.bin, .npy, a folder with train.bin and val.bin); "
                            "records (.jsonl, .json, .parquet, .csv, a datasets.save_to_disk folder).",
                            means="the Python standard library")
    tokenizer: str | None = knob(None, Optional(Text(), "a path"), "Local Hugging Face tokenizer folder for text and records.",
                                 means="bytes, vocabulary 256")
    data_dtype: str | None = knob(None, Optional(Choice(DATA_DTYPES, ", ".join(DATA_DTYPES)), ", ".join(DATA_DTYPES)),
                                  "Type of the ids in .bin token files.", means="uint16 for .bin, the file's own for .npy")
    text_field: str | None = knob(None, Optional(Text(nonempty=True), "a column name"),
                                  "Column of the records that holds the text.", means="text")
    val_fraction: float = knob(0.05, Number(0, 1, "a number in (0, 1)", lo_open=True, hi_open=True),
                               "Share of the data held out for validation.")
    dense: bool = knob(False, Flag(), "The dense baseline: the same run without sparsity.", flags=())
    # under torchrun: shard parameters, gradients and optimizer state per block with FSDP2 instead of
    # DDP replicas (train/sharded.py); the checkpoints stay whole (docs/design.md §4)
    fsdp: bool = knob(False, Flag(), "Shard with FSDP2 per block instead of DDP replicas.", flags=())
    # steps the MST and learning-rate schedules span; None: steps. A resume with a longer --steps keeps
    # the original span and trains the extra steps in the final phase at min_lr (docs: Resuming).
    schedule_steps: int | None = knob(None, _OPT_GE1,
                                      "Steps the MST and learning-rate schedules span; later steps train in the final phase.",
                                      means="--steps")

    def __post_init__(self) -> None:
        validate(self, "TrainConfig")
        if self.min_lr is not None and self.min_lr > self.lr:
            fail("TrainConfig", "min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        if self.schedule_steps is not None and self.schedule_steps > self.steps:
            fail("TrainConfig", "schedule_steps", self.schedule_steps, f"at most steps={self.steps}")

    def resolved(self, mst: MSTConfig, model_block_size: int | None = None) -> TrainConfig:
        """Fill every None with its rule (the saved config has concrete numbers only)."""
        steps = self.steps
        block = self.block_size or model_block_size or 128
        ev = self.eval_interval or max(1, steps // 5)
        return dataclasses.replace(
            self, block_size=block, eval_interval=ev, schedule_steps=self.schedule_steps or steps,
            min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
            warmup_steps=max(1, (self.schedule_steps or steps) // 20) if self.warmup_steps is None else self.warmup_steps,
            checkpoint_interval=self.checkpoint_interval or ev,
            lr_decay=self.lr_decay or (round(1.0 - mst.ultra_end, 12) if mst.ultra_end < 1 else DEFAULT_LR_DECAY),
        )


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
MST_KEYS = KEYS


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
    if "model" in doc and isinstance(doc.get("mst"), dict):  # a run folder's own record: may predate the recipe/ablation split
        doc["mst"] = upgrade_saved(doc["mst"], doc.get("train") if isinstance(doc.get("train"), dict) else {})
    train, mst = {}, {}
    for key, value in doc.items():
        if key in ("train", "mst") and isinstance(value, dict):
            _check_keys(p, key, value)
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
    return train, mst


# What a run folder's [mst] table left out when it was written, for keys whose default has changed since (or that
# did not exist yet): the value that run trained with, so a resumed or exported old run keeps its recipe.
SAVED_BEFORE = {"warmup_end": 0.1, "lr_density_power": 0.0, "lr_density_scope": "run", "attention_depth": 1.0}


def upgrade_saved(mst: dict, train: dict) -> dict:
    """A saved ``[mst]`` table in an earlier spelling: the same run in today's keys. Keys it predates get the value
    the run used (``SAVED_BEFORE``). In the spelling before ``Ablation``, its
    ``total_steps`` and ``seed`` were copies of ``[train]``'s steps and seed (the trainer wrote both), so they go;
    ``drop_fractions`` (when set) was the per-phase ζ; the ablation switches move to ``[mst.ablation]``."""
    mst = dict(mst)
    for k, was in SAVED_BEFORE.items():  # a record written before the key existed ran at its default of then
        mst.setdefault(k, was)
    for k, twin in (("total_steps", "steps"), ("seed", "seed")):
        if k in mst and (twin not in train or train[twin] == mst[k]):
            del mst[k]
    mst.pop("extra", None)
    if "drop_fractions" in mst:
        per_phase = mst.pop("drop_fractions")
        if per_phase is not None and per_phase != "none":
            mst["drop_fraction"] = per_phase
    moved = {k: mst.pop(k) for k in ABLATION_KEYS if k in mst}
    if moved:
        mst["ablation"] = {**moved, **(mst.get("ablation") or {})}
    return mst


def _check_keys(p: Path, table: str, value: dict) -> None:
    """Unknown keys of ``[train]``, ``[mst]`` and ``[mst.ablation]`` are one line; a removed one names its new spelling."""
    if table == "mst":
        gone = sorted(set(value) & set(GONE))
        if gone:
            raise MstCompileError(f"config file {p}: [mst] {gone[0]} is no longer accepted: {GONE[gone[0]]}")
        if isinstance(value.get("ablation"), dict):
            _check_keys(p, "mst.ablation", value["ablation"])
    allowed = {"train": TRAIN_KEYS, "mst": MST_KEYS, "mst.ablation": ABLATION_KEYS}[table]
    bad = sorted(set(value) - set(allowed))
    if bad:
        raise MstCompileError(f"config file {p}: unknown key(s) {bad} in [{table}]; allowed: {', '.join(sorted(allowed))}")


def read_model_record(run_dir: str | Path) -> dict:
    """``{"model": path, "model_sha256": hash}`` as the run's config.toml recorded them (either may be absent)."""
    doc = tomllib.loads((Path(run_dir) / CONFIG).read_text())
    return {k: doc[k] for k in ("model", "model_sha256") if k in doc}


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
    recipe = mst.to_dict()
    ablation = recipe.pop("ablation")
    for table, d in (("train", dataclasses.asdict(train)), ("mst", recipe), ("mst.ablation", ablation)):
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
