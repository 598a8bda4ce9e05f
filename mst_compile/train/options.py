"""The flags ``mstc train`` builds from the model file's hooks, a TOML config file and its command line
(``TrainConfig`` and the TOML itself live in ``mst_compile.run_config``).

Precedence, lowest first: dataclass defaults < the model file's ``config()`` / ``train_config()``
hooks < ``--config file.toml`` < command-line flags. The resolved pair is saved with the run as
``config.toml`` (readable again with ``--config``).

Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ..config import MSTConfig
from ..errors import MstCompileError
from ..run_config import (  # re-exported: the trainer, the CLI and tests use them from here
    DATA_DTYPES,
    MST_KEYS,
    PRECISIONS,
    TRAIN_KEYS,
    TrainConfig,
    dumps_config,
    fold_steps,
    read_config_file,
    read_model_record,
)

__all__ = ["DATA_DTYPES", "MST_KEYS", "PRECISIONS", "TRAIN_KEYS", "TrainConfig", "build_configs", "click_options",
           "configs_for_model_file", "dumps_config", "flag_for", "in_flag_terms", "parse_mst_flag", "read_config_file",
           "read_model_record", "split_flags"]


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
    fold_steps(train_flags, flags_mst)
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
    "block_size": "Tokens per sequence.", "lr": "Peak learning rate.",
    "min_lr": "Learning rate at the end of the decay.",
    "lr_schedule": "Learning-rate curve of every run, dense or MST: wsd (flat, then a cosine decay over the last --lr-decay "
                   "of the run) or cosine (over the whole run).",
    "lr_decay": "WSD: fraction of the run the learning rate decays over.",
    "warmup_steps": "Linear learning-rate warm-up steps.",
    "weight_decay": "AdamW weight decay on matrices.", "beta1": "AdamW beta1.", "beta2": "AdamW beta2.",
    "grad_clip": "Clip the global gradient norm (0: off).", "grad_accum": "Micro-batches per optimizer step.",
    "eval_interval": "Steps between evaluations.", "eval_iters": "Batches per split per evaluation.",
    "log_interval": "Steps between metrics.jsonl lines.", "checkpoint_interval": "Steps between checkpoints.",
    "keep_checkpoints": "Newest checkpoints kept in the run folder (at least 2).",
    "schedule_steps": "Steps the MST and learning-rate schedules span; later steps train in the final phase.",
    "seed": "Seed of model init, batch order and random growth.", "device": "auto, cpu, cuda or cuda:N.",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast and a grad scaler); weights stay fp32.",
    "data": ("Text file, folder or quoted glob; token ids (.bin, .npy, a folder with train.bin and val.bin); records "
             "(.jsonl, .json, .parquet, .csv, a datasets.save_to_disk folder)."),
    "tokenizer": "Local Hugging Face tokenizer folder for text and records.",
    "data_dtype": "Type of the ids in .bin token files.",
    "text_field": "Column of the records that holds the text.",
    "val_fraction": "Share of the data held out for validation.",
    "sparsity": "Sparsity of the ultra-sparsification phase.", "final_sparsity": "Sparsity at the end of restoration.",
    "warmup_end": "End of the MST warm-up phase as a fraction of steps.", "ultra_end": "End of the ultra phase as a fraction of steps.",
    "schedule": "Piecewise-linear sparsity schedule STEP:SPARSITY,... (replaces the three phases).",
    "distribution": "Layer-wise density distribution.", "update_interval": "Steps between topology updates.",
    "drop_fraction": "Drop fraction of every phase.", "drop_fractions": "Drop fraction per phase: WARMUP,ULTRA,RESTORATION.",
    "grow_gradient_fraction": "Share of regrown weights picked by gradient (rest random).",
    "attention": "Sparse attention pattern.", "stride": "Sparse attention stride.",
    "attention_phases": "Phases that use the sparse attention pattern, e.g. ultra or warmup,ultra.",
    "sparse_kernel": "Sparse linear kernel (tile, triton: tile-structured masks only).",
    "tile": "Tile-structured masks: constant on TILE x TILE tiles (8, 16, 32, 64 or 128).",
    "grow_init_scale": "Grown weights start at N(0, (scale x rms of active weights)^2); 0: at zero.",
    "attention_restore": "Leaving the sparse-attention phases: switch (dense at once) or widen (gradually).",
    "restoration_shape": "When restored weights return: late (1-u^3), linear, or early ((1-u)^3).",
}
# what a flag whose field defaults to None stands for (the rest show the dataclass default)
_DEFAULT_RULES = {
    "block_size": "the model's block_size, else 128", "min_lr": "lr/10",
    "lr_decay": "the restoration phase, 1 - ultra_end; 0.2 without one", "data_dtype": "uint16 for .bin, the file's own for .npy",
    "text_field": "text", "tile": "none: unstructured masks",
    "warmup_steps": "5% of steps", "eval_interval": "steps/5", "checkpoint_interval": "the eval interval",
    "schedule_steps": "--steps", "data": "the Python standard library", "tokenizer": "bytes, vocabulary 256",
    "schedule": "the three phases", "update_interval": "from the run length", "stride": "T/8",
    "drop_fractions": "--drop-fraction, --drop-fraction, 0", "attention_sites": "none",
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


def flag_for(name: str) -> str:
    """The command-line flag of a TrainConfig or MSTConfig field (``total_steps`` is ``--steps``)."""
    return "--steps" if name in ("steps", "total_steps") else f"--{name.replace('_', '-')}"


def in_flag_terms(message: str, given: dict[str, Any]) -> str:
    """``message`` with each ``TrainConfig.x=v`` / ``MSTConfig.x=v`` of a flag given on the command
    line written as it was typed there (``TrainConfig.steps=0`` -> ``--steps 0``). ``given``: the flags'
    values by field name, as click parsed them. The Python API's messages name the fields; values
    that came from a config file or a model file's hooks keep those names."""
    for name, raw in given.items():
        value = raw
        if isinstance(raw, str) and name in ("schedule", "drop_fractions", "attention_phases", "stride"):
            try:
                value = parse_mst_flag(name, raw)  # as the config holds it
            except ValueError:
                continue
        for owner, field in (("TrainConfig", name), ("MSTConfig", "total_steps" if name == "steps" else name)):
            message = message.replace(f"{owner}.{field}={value!r}", f"{flag_for(name)} {raw if isinstance(raw, str) else _shown(raw)}")
            message = re.sub(rf"\b{owner}\.{field}\b(?!\[)", flag_for(name), message)  # "MSTConfig.schedule has a point ..."
    return message


def _shown(value) -> str:
    """A default as it would be typed: 0.001, not 0.001000; ultra,restoration for a tuple."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(_shown, value))
    if isinstance(value, float):
        return repr(value).removesuffix(".0")  # 0.001, 1e-05, 2 (not 2.0)
    return str(value)


def _default(f, **option) -> dict:
    """click keywords for field ``f``'s default: the dataclass default, shown in the help, or for a
    field that defaults to None the rule it stands for. Either way ``split_flags`` passes on only the
    flags given on the command line, so the model file's hooks and --config can still set the rest."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if f.name == "steps":
        default = MSTConfig.total_steps  # one knob: the MST schedule's length
    if default is None or option.get("multiple"):
        return {**option, "default": None, "show_default": _DEFAULT_RULES.get(f.name, False)}
    return {**option, "default": _shown(default) if isinstance(default, tuple) else default, "show_default": True}


def click_options(fn=None, *, train_fields: tuple[str, ...] | None = None, help: dict[str, str] | None = None):
    """Decorate ``mstc train`` with one flag per TrainConfig and MSTConfig field (``train_fields``:
    only those TrainConfig fields, for a command such as ``mstc plan`` that uses a few; ``help``: a
    command's own wording of some flags). The help shows each flag's built-in default."""
    if fn is None:
        return lambda f: click_options(f, train_fields=train_fields, help=help)
    import click

    from ..constants import ATTENTION_PATTERNS, ATTENTION_RESTORES, DISTRIBUTIONS, LR_SCHEDULES, RESTORATION_SHAPES, SPARSE_KERNELS

    texts = {**_HELP, **(help or {})}
    choices = {"distribution": DISTRIBUTIONS, "attention": ATTENTION_PATTERNS, "sparse_kernel": SPARSE_KERNELS,
               "attention_restore": ATTENTION_RESTORES, "restoration_shape": RESTORATION_SHAPES}
    specs = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "dense" or (train_fields is not None and f.name not in train_fields):
            continue  # dense: a plain switch, declared by the command
        flags = ["--steps", "--total-steps"] if f.name == "steps" else [flag_for(f.name)]
        typ = str if f.name in ("device", "data", "tokenizer", "text_field") else (float if f.type.startswith("float") else int)
        enum = {"precision": PRECISIONS, "lr_schedule": LR_SCHEDULES, "data_dtype": DATA_DTYPES}.get(f.name)
        typ = click.Choice(enum) if enum else typ
        specs.append(click.option(*flags, f"train__{f.name}", **_default(f, type=typ, help=texts.get(f.name))))
    for f in dataclasses.fields(MSTConfig):
        if f.name in ("total_steps", "seed"):
            continue  # --steps and --seed set them
        if f.name == "extra":
            specs.append(click.option("--extra", "mst__extra", multiple=True, metavar="KEY=VALUE", show_default="none",
                                      help="Free-form note stored with the run's config (repeatable)."))
            continue
        if f.name == "attention_sites":
            specs.append(click.option("--attention-sites", "mst__attention_sites",
                                      **_default(f, multiple=True, metavar="SITE=PATTERN", help=_HELP_SITES)))
            continue
        if f.name in choices:
            typ = click.Choice(choices[f.name])
        elif f.name in ("schedule", "drop_fractions", "attention_phases", "stride"):
            typ = str
        else:
            typ = int if f.type.startswith("int") else float
        specs.append(click.option(flag_for(f.name), f"mst__{f.name}", **_default(f, type=typ, help=texts.get(f.name))))
    for spec in reversed(specs):
        fn = spec(fn)
    return fn


def split_flags(kwargs: dict) -> tuple[dict, dict]:
    """Pull the ``train__*`` and ``mst__*`` flags given on the command line out of a command's kwargs
    (a flag left at its default is not given: the hooks and --config below it decide)."""
    import click
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    train, mst = {}, {}
    for key in [k for k in kwargs if k.startswith(("train__", "mst__"))]:
        value = kwargs.pop(key)
        if value is None or value == () or (ctx is not None and ctx.get_parameter_source(key) in defaults):
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
