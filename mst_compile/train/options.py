"""The flags ``mstc train`` builds from the model file's hooks, a TOML config file and its command line
(``TrainConfig`` and the TOML itself live in ``mst_compile.run_config``).

Precedence, lowest first: dataclass defaults < the model file's ``config()`` / ``train_config()``
hooks < ``--config file.toml`` < command-line flags. The resolved pair is saved with the run as
``config.toml`` (readable again with ``--config``).

Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import Ablation, MSTConfig
from ..errors import MstCompileError
from ..fields import Bad, flags_of, spec_of
from ..run_config import (  # re-exported: the trainer, the CLI and tests use them from here
    DATA_DTYPES,
    MST_KEYS,
    PRECISIONS,
    TRAIN_KEYS,
    TrainConfig,
    dumps_config,
    read_config_file,
    read_model_record,
)

__all__ = ["DATA_DTYPES", "MST_KEYS", "PRECISIONS", "TRAIN_KEYS", "TrainConfig", "build_configs", "click_options",
           "configs_for_model_file", "dumps_config", "flag_for", "in_flag_terms", "parse_flag", "read_config_file",
           "read_model_record", "split_flags"]

# every field that has a flag, by its flag key: "train__steps", "mst__sparsity", "mst__ablation__restoration_shape"
_FIELDS = {f"{key}__{f.name}": f for key, cls in (("train", TrainConfig), ("mst", MSTConfig), ("mst__ablation", Ablation))
           for f in dataclasses.fields(cls) if flags_of(f)}
_BY_NAME = {key.rsplit("__", 1)[1]: f for key, f in _FIELDS.items()}


# -- resolution ------------------------------------------------------------------------------
def _merge(mst: dict, changes: dict) -> None:
    """``mst.update(changes)``, the ``ablation`` group key by key."""
    for k, v in changes.items():
        if k == "ablation" and isinstance(v, dict) and isinstance(mst.get(k), dict):
            mst[k] = {**mst[k], **v}
        else:
            mst[k] = v


def build_configs(base_mst: MSTConfig | None, base_train: dict | None, file: str | None,
                  train_flags: dict, mst_flags: dict) -> tuple[TrainConfig, MSTConfig]:
    """Merge hooks < file < flags into (TrainConfig, MSTConfig)."""
    train = dict(base_train or {})
    mst = (base_mst or MSTConfig()).to_dict()
    if file:
        ft, fm = read_config_file(file)
        train.update(ft)
        _merge(mst, fm)
    train.update(train_flags)
    _merge(mst, mst_flags)
    bad = sorted(set(train) - set(TRAIN_KEYS))
    if bad:
        raise MstCompileError(f"unknown training option(s) {bad}; allowed: {', '.join(TRAIN_KEYS)}")
    return TrainConfig(**train), MSTConfig.from_dict(mst)


# -- flags -------------------------------------------------------------------------------------
def parse_flag(name: str, text: Any) -> Any:
    """A flag's value (as click converted it) as its field holds it; one line naming the flag when it does not parse."""
    try:
        return spec_of(_BY_NAME[name]).kind.parse(text)
    except Bad as e:
        raise ValueError(f"{flag_for(name)} {text!r} is invalid: expected {e.expected}") from None


def flag_for(name: str) -> str:
    """The command-line flag of a TrainConfig, MSTConfig or Ablation field."""
    return flags_of(_BY_NAME[name])[0] if name in _BY_NAME else f"--{name.replace('_', '-')}"


def in_flag_terms(message: str, given: dict[str, Any]) -> str:
    """``message`` with each ``TrainConfig.x=v`` / ``MSTConfig.x=v`` of a flag given on the command
    line written as it was typed there (``TrainConfig.steps=0`` -> ``--steps 0``). ``given``: the flags'
    values by field name, as click parsed them. The Python API's messages name the fields; values
    that came from a config file or a model file's hooks keep those names."""
    for name, raw in given.items():
        value = raw
        if isinstance(raw, str) and name in _BY_NAME and spec_of(_BY_NAME[name]).kind.cli is str:
            try:
                value = parse_flag(name, raw)  # as the config was given it
            except ValueError:
                continue
        for owner in ("TrainConfig", "MSTConfig", "Ablation"):
            message = message.replace(f"{owner}.{name}={value!r}", f"{flag_for(name)} {raw if isinstance(raw, str) else _shown(raw)}")
            message = re.sub(rf"\b{owner}\.{name}\b(?!\[)", flag_for(name), message)  # "MSTConfig.schedule has a point ..."
    return message


def _shown(value) -> str:
    """A default as it would be typed: 0.001, not 0.001000; ultra,restoration for a tuple."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(_shown, value))
    if isinstance(value, float):
        return repr(value).removesuffix(".0")  # 0.001, 1e-05, 2 (not 2.0)
    return str(value)


def _option(key: str, f: dataclasses.Field, help_text: str | None):
    """The click option of field ``f`` from its spec: type, choices, help and the default shown (the
    dataclass default, or for a field that defaults to None the rule it stands for). Either way
    ``split_flags`` passes on only the flags given on the command line, so the model file's hooks and
    --config can still set the rest."""
    import click

    spec = spec_of(f)
    kind = spec.kind
    typ = click.Choice(kind.choices) if kind.choices and kind.cli is str else kind.cli
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    extra = {"metavar": spec.metavar} if spec.metavar else {}
    if default is None or spec.multiple:
        shown: dict = {"default": None, "show_default": spec.means or False}
    else:
        shown = {"default": _shown(default) if isinstance(default, tuple) else default, "show_default": True}
    return click.option(*flags_of(f), key, type=typ, multiple=spec.multiple, help=help_text or spec.help, **shown, **extra)


def click_options(fn=None, *, train_fields: tuple[str, ...] | None = None, help: dict[str, str] | None = None):
    """Decorate ``mstc train`` with one flag per TrainConfig, MSTConfig and Ablation field (``train_fields``:
    only those TrainConfig fields, for a command such as ``mstc plan`` that uses a few; ``help``: a
    command's own wording of some flags). The help shows each flag's built-in default."""
    if fn is None:
        return lambda f: click_options(f, train_fields=train_fields, help=help)
    texts = help or {}
    specs = [_option(key, f, texts.get(f.name)) for key, f in _FIELDS.items()
             if not key.startswith("train__") or train_fields is None or f.name in train_fields]
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
        name = key.rsplit("__", 1)[1]
        value = parse_flag(name, value)
        if key.startswith("train__"):
            train[name] = value
        elif key.startswith("mst__ablation__"):
            mst.setdefault("ablation", {})[name] = value
        else:
            mst[name] = value
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
