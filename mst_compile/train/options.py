"""Training knobs (``TrainConfig``), TOML config files, and the flags ``mstc train`` builds from both.

Precedence, lowest first: dataclass defaults < the model file's ``config()`` / ``train_config()``
hooks < ``--config file.toml`` < command-line flags. The resolved pair is saved with the run as
``config.toml`` (readable again with ``--config``).

Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from ..config import MSTConfig
from ..errors import MstCompileError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything about a training run that is not MST itself."""

    steps: int | None = None  # optimizer steps; None: the MST config's total_steps
    batch_size: int = 16  # sequences per micro-batch per process
    block_size: int | None = None  # tokens per sequence; None: the model's block_size (else 128)
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # end of the cosine decay; None: lr / 10
    warmup_steps: int | None = None  # linear lr warm-up; None: 5% of steps
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
    data: str | None = None  # text file, folder or glob; None: the Python standard library
    tokenizer: str | None = None  # local Hugging Face tokenizer folder; None: bytes (vocab 256)
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
            allowed = TRAIN_KEYS if key == "train" else MST_KEYS + ("steps",)
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
    _fold_steps(train, mst)
    return train, mst


def read_model_record(run_dir: str | Path) -> dict:
    """``{"model": path, "model_sha256": hash}`` as the run's config.toml recorded them (either may be absent)."""
    doc = tomllib.loads((Path(run_dir) / "config.toml").read_text())
    return {k: doc[k] for k in ("model", "model_sha256") if k in doc}


def _fold_steps(train: dict, mst: dict) -> None:
    """``steps`` and ``total_steps`` are one knob: the run's length is the MST schedule's length."""
    if "steps" in mst:
        train.setdefault("steps", mst.pop("steps"))
    if "total_steps" in mst:
        train.setdefault("steps", mst.pop("total_steps"))
    if "seed" in mst:  # one seed drives init, data order and random growth
        train.setdefault("seed", mst.pop("seed"))


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


# -- resolution ------------------------------------------------------------------------------
def build_configs(base_mst: MSTConfig | None, base_train: dict | None, file: str | None,
                  train_flags: dict, mst_flags: dict) -> tuple[TrainConfig, MSTConfig]:
    """Merge hooks < file < flags into (TrainConfig, MSTConfig). Steps and seed are shared."""
    train = dict(base_train or {})
    mst = (base_mst or MSTConfig()).to_dict()
    if "seed" not in train:
        train["seed"] = mst["seed"]
    train.setdefault("steps", mst["total_steps"])
    if file:
        ft, fm = read_config_file(file)
        train.update(ft)
        mst.update(fm)
    flags_mst = dict(mst_flags)
    _fold_steps(train_flags, flags_mst)
    train.update(train_flags)
    mst.update(flags_mst)
    bad = sorted(set(train) - set(TRAIN_KEYS))
    if bad:
        raise MstCompileError(f"unknown training option(s) {bad}; allowed: {', '.join(TRAIN_KEYS)}")
    tc = TrainConfig(**train)
    mst["total_steps"] = tc.steps
    mst["seed"] = tc.seed
    return tc, MSTConfig.from_dict(mst)


# -- flags -------------------------------------------------------------------------------------
def parse_mst_flag(name: str, text: str) -> Any:
    """Flags for MSTConfig fields that are not plain numbers or names."""
    try:
        if name == "schedule":  # "0:0,100:0.9,800:0.9,1000:0.5"
            return [(int(s), float(v)) for s, v in (p.split(":") for p in text.split(",") if p.strip())]
        if name == "drop_fractions":  # "0.3,0.3,0.2"
            return tuple(float(z) for z in text.split(","))
        if name == "attention_phases":  # "ultra" or "warmup,ultra"
            return tuple(p.strip() for p in text.split(",") if p.strip())
        if name == "stride":
            return None if text.lower() in ("none", "auto") else int(text)
    except ValueError:
        pass
    else:
        return text
    hints = {"schedule": "STEP:SPARSITY pairs like 0:0,100:0.9,1000:0.5", "drop_fractions": "three numbers like 0.3,0.3,0.3",
             "stride": "an integer or auto"}
    raise ValueError(f"--{name.replace('_', '-')} {text!r} is invalid: expected {hints[name]}")


_HELP = {
    "steps": "Optimizer steps (= MST total_steps).", "batch_size": "Sequences per micro-batch per process.",
    "block_size": "Tokens per sequence (default: the model's block_size, else 128).", "lr": "Peak learning rate.",
    "min_lr": "Learning rate at the end of the cosine decay (default lr/10).",
    "warmup_steps": "Linear learning-rate warm-up steps (default 5% of steps).",
    "weight_decay": "AdamW weight decay on matrices.", "beta1": "AdamW beta1.", "beta2": "AdamW beta2.",
    "grad_clip": "Clip the global gradient norm (0: off).", "grad_accum": "Micro-batches per optimizer step.",
    "eval_interval": "Steps between evaluations (default steps/5).", "eval_iters": "Batches per split per evaluation.",
    "log_interval": "Steps between metrics.jsonl lines.", "checkpoint_interval": "Steps between checkpoints (default: eval interval).",
    "keep_checkpoints": "Newest checkpoints kept in the run folder (at least 2).",
    "schedule_steps": "Steps the MST and learning-rate schedules span (default: --steps); later steps train in the final phase.",
    "seed": "Seed of model init, batch order and random growth.", "device": "auto, cpu, cuda or cuda:N.",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast and a grad scaler); weights stay fp32.",
    "data": "Text file, folder or glob of text files (default: the Python standard library).",
    "tokenizer": "Local Hugging Face tokenizer folder (default: bytes).", "val_fraction": "Share of the data held out for validation.",
    "sparsity": "Sparsity of the ultra-sparsification phase.", "final_sparsity": "Sparsity at the end of restoration.",
    "warmup_end": "End of the MST warm-up phase as a fraction of steps.", "ultra_end": "End of the ultra phase as a fraction of steps.",
    "schedule": "Piecewise-linear sparsity schedule STEP:SPARSITY,... (replaces the three phases).",
    "distribution": "Layer-wise density distribution.", "update_interval": "Steps between topology updates.",
    "drop_fraction": "Drop fraction of every phase.", "drop_fractions": "Drop fraction per phase: WARMUP,ULTRA,RESTORATION.",
    "grow_gradient_fraction": "Share of regrown weights picked by gradient (rest random).",
    "attention": "Sparse attention pattern.", "stride": "Sparse attention stride (default T/8).",
    "attention_phases": "Phases that use the sparse attention pattern, e.g. ultra or warmup,ultra.",
    "sparse_kernel": "CPU sparse linear kernel.",
    "lr_schedule": "LR shape: cosine (phase-blind) or wsd (stable, then decay over restoration).",
    "grow_init_scale": "Grown weights start at N(0, (scale x rms of active weights)^2); 0: at zero.",
    "attention_restore": "Leaving the sparse-attention phases: switch (dense at once) or widen (gradually).",
    "restoration_shape": "When restored weights return: late (1-u^3), linear, or early ((1-u)^3).",
}
_HELP_SITES = ("Per-site attention rule SITE=PATTERN or SITE=PHASE:PATTERN,... (SITE: name or glob; repeatable, "
               "later rules win), e.g. 'h.*.attn=local' 'h.0.attn=ultra:dense'.")


def parse_attention_sites(texts) -> dict:
    """``--attention-sites`` values: ``SITE=PATTERN`` or ``SITE=PHASE:PATTERN,PHASE:PATTERN`` each
    (SITE a name or fnmatch glob), in order; later rules override earlier ones."""
    rules: dict = {}
    for text in texts:
        site, sep, spec = text.rpartition("=")
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        phased = [":" in p for p in parts]
        if not sep or not site.strip() or not parts or not (all(phased) or parts == [spec.strip()]):
            raise ValueError(f"--attention-sites {text!r} is invalid: expected SITE=PATTERN or SITE=PHASE:PATTERN,... "
                             "like 'h.*.attn=local' or 'h.0.attn=ultra:dense'")
        rules[site.strip()] = {k.strip(): v.strip() for k, v in (p.split(":", 1) for p in parts)} if all(phased) else parts[0]
    return rules


def _key_value(text: str) -> tuple[str, Any]:
    """``--extra lr_note=0.5`` -> ("lr_note", 0.5): JSON values where they parse, else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--extra {text!r} is invalid: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def click_options(fn):
    """Decorate ``mstc train`` with one flag per TrainConfig and MSTConfig field."""
    import click

    from ..vocab import ATTENTION_PATTERNS, ATTENTION_RESTORES, DISTRIBUTIONS, LR_SCHEDULES, RESTORATION_SHAPES, SPARSE_KERNELS

    choices = {"distribution": DISTRIBUTIONS, "attention": ATTENTION_PATTERNS, "sparse_kernel": SPARSE_KERNELS,
               "lr_schedule": LR_SCHEDULES, "attention_restore": ATTENTION_RESTORES, "restoration_shape": RESTORATION_SHAPES}
    specs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "dense":
            continue  # a plain switch, declared by the command
        flags = ["--steps", "--total-steps"] if f.name == "steps" else [f"--{f.name.replace('_', '-')}"]
        typ = str if f.name in ("device", "data", "tokenizer") else (float if f.type.startswith("float") else int)
        typ = click.Choice(PRECISIONS) if f.name == "precision" else typ
        specs.append(click.option(*flags, f"train__{f.name}", type=typ, default=None, help=_HELP.get(f.name)))
    for f in dataclasses.fields(MSTConfig):
        if f.name in ("total_steps", "seed"):
            continue  # --steps and --seed set them
        if f.name == "extra":
            specs.append(click.option("--extra", "mst__extra", multiple=True, metavar="KEY=VALUE",
                                      help="Free-form note stored with the run's config (repeatable)."))
            continue
        if f.name == "attention_sites":
            specs.append(click.option("--attention-sites", "mst__attention_sites", multiple=True, metavar="SITE=PATTERN",
                                      help=_HELP_SITES))
            continue
        if f.name in choices:
            typ = click.Choice(choices[f.name])
        elif f.name in ("schedule", "drop_fractions", "attention_phases", "stride"):
            typ = str
        else:
            typ = int if f.type.startswith("int") else float
        specs.append(click.option(f"--{f.name.replace('_', '-')}", f"mst__{f.name}", type=typ, default=None,
                                  help=_HELP.get(f.name)))
    for spec in reversed(specs):
        fn = spec(fn)
    return fn


def split_flags(kwargs: dict) -> tuple[dict, dict]:
    """Pull the given (non-None) ``train__*`` and ``mst__*`` flags out of a command's kwargs."""
    train, mst = {}, {}
    for key in [k for k in kwargs if k.startswith(("train__", "mst__"))]:
        value = kwargs.pop(key)
        if value is None or value == ():
            continue
        table, name = key.split("__", 1)
        if name == "extra":
            value = dict(_key_value(v) for v in value)
        if name == "attention_sites":
            value = parse_attention_sites(value)
        if table == "mst" and isinstance(value, str) and name in ("schedule", "drop_fractions", "attention_phases", "stride"):
            value = parse_mst_flag(name, value)
        (train if table == "train" else mst)[name] = value
    return train, mst


def configs_for_model_file(mf, config_file: str | None, train_flags: dict, mst_flags: dict) -> tuple[TrainConfig, MSTConfig]:
    """Hooks of the model file (``config()``, optional ``train_config()``), then the file, then flags."""
    base_train = {}
    if mf.hook("train_config") is not None:
        got = mf.call("train_config")
        if isinstance(got, TrainConfig):
            got = {f.name: getattr(got, f.name) for f in dataclasses.fields(TrainConfig)}
        if not isinstance(got, dict):
            raise MstCompileError(f"{mf.path}: train_config() returned {type(got).__name__}, expected a dict or TrainConfig")
        base_train = {k: v for k, v in got.items() if v is not None}
    return build_configs(mf.config(), base_train, config_file, dict(train_flags), dict(mst_flags))
