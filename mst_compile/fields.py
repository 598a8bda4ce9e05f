"""Field specs: the facts about each field of ``MSTConfig``, ``Ablation`` and ``TrainConfig`` (what it
holds, its range, its help, what its None default stands for, its ``mstc`` flag), written once as
dataclass field metadata. Validation (``validate``), TOML reading (the keys) and the command-line
options (``train/options.py``) are all built from them.

Importing this module imports neither torch nor click.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class Bad(Exception):
    """Raised by ``Kind.norm``/``Kind.parse``: ``expected`` says what a valid value is (None: the kind's own)."""

    def __init__(self, expected: str | None = None):
        super().__init__(expected)
        self.expected = expected


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Kind:
    """What a field holds. ``norm`` checks a value and returns it as the config stores it; ``parse``
    turns a flag's text (after click converted it to ``cli``) into such a value."""

    expected = "a valid value"
    cli: Any = str  # what click converts the flag's text to: int, float or str
    choices: tuple | None = None  # click.Choice names

    def norm(self, v: Any) -> Any:
        return v

    def parse(self, text: Any) -> Any:
        return text


class Number(Kind):
    """A number in a range; ``lo_open``/``hi_open`` exclude the ends (None: unbounded)."""

    cli = float

    def __init__(self, lo: float | None, hi: float | None, expected: str, *, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open, self.expected = lo, hi, lo_open, hi_open, expected

    def norm(self, v):
        if not is_number(v):
            raise Bad
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise Bad
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            raise Bad
        return v


class Integer(Kind):
    """An integer >= ``least`` (None: any integer)."""

    cli = int

    def __init__(self, least: int | None = 1, expected: str | None = None):
        self.least = least
        self.expected = expected or ("an integer" if least is None else f"an integer >= {least}")

    def norm(self, v):
        if not is_int(v) or (self.least is not None and v < self.least):
            raise Bad
        return v


class Choice(Kind):
    """One of ``names``; ``gone`` maps a name no longer accepted to the one-line reason and the name to use."""

    def __init__(self, names: tuple, expected: str | None = None, gone: dict[str, str] | None = None):
        self.choices, self.gone = tuple(names), dict(gone or {})
        self.cli = int if all(is_int(n) for n in names) else str
        self.expected = expected or f"one of {', '.join(map(str, names))}"

    def norm(self, v):
        if isinstance(v, str) and v in self.gone:
            raise Bad(self.gone[v])
        if type(v) is not type(self.choices[0]) or v not in self.choices:
            raise Bad
        return v


class Text(Kind):
    """A string (``nonempty``: with at least one character)."""

    def __init__(self, expected: str = "a string", nonempty: bool = False):
        self.expected, self.nonempty = expected, nonempty

    def norm(self, v):
        if not isinstance(v, str) or (self.nonempty and not v):
            raise Bad
        return v


class Flag(Kind):
    expected = "true or false"

    def norm(self, v):
        if not isinstance(v, bool):
            raise Bad
        return v


class Optional(Kind):
    """None, or a value of ``kind``; ``nulls``: flag texts that mean None (``--stride auto``)."""

    def __init__(self, kind: Kind, expected: str, nulls: tuple[str, ...] = ()):
        self.kind, self.expected, self.nulls = kind, expected, nulls
        self.cli, self.choices = (str if nulls else kind.cli), kind.choices

    def norm(self, v):
        if v is None:
            return None
        try:
            return self.kind.norm(v)
        except Bad as e:
            raise Bad(e.expected and f"None or {e.expected}") from None

    def parse(self, text):
        if isinstance(text, str) and text.lower() in self.nulls:
            return None
        if self.nulls:
            try:
                return self.kind.cli(text)
            except ValueError:
                raise Bad(self.expected) from None
        return self.kind.parse(text)


@dataclass(frozen=True)
class Spec:
    """One field's facts. ``means``: what a None default stands for (shown as the flag's default).
    ``flags``: its command-line flags (default ``--name-with-dashes``; ``()``: no flag of its own)."""

    kind: Kind
    help: str
    means: str | None = None
    flags: tuple[str, ...] | None = None
    metavar: str | None = None
    multiple: bool = False  # the flag may repeat; ``kind.parse`` gets every value given, in order


def knob(default: Any, kind: Kind, help: str, **spec: Any) -> Any:
    """A dataclass field with its ``Spec`` (a callable ``default`` is a default factory)."""
    meta = {"spec": Spec(kind, help, **spec)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def spec_of(f: dataclasses.Field) -> Spec | None:
    return f.metadata.get("spec")


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    spec = spec_of(f)
    if spec is not None and spec.flags is not None:
        return spec.flags
    return (f"--{f.name.replace('_', '-')}",)


def fail(owner: str, name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {expected}")


def validate(obj: Any, owner: str) -> None:
    """Check every field of the dataclass ``obj`` against its spec and store the normalised value
    (``obj`` may be frozen). Raises one line: ``Owner.field=value is invalid: expected ...``."""
    for f in dataclasses.fields(obj):
        spec = spec_of(f)
        if spec is None:
            continue
        value = getattr(obj, f.name)
        try:
            normal = spec.kind.norm(value)
        except Bad as e:
            fail(owner, f.name, value, e.expected or spec.kind.expected)
        object.__setattr__(obj, f.name, normal)


def refuse_gone(owner: str, keys, gone: dict[str, str]) -> None:
    """One line for the first of ``keys`` that is no longer a field: what it became."""
    for k in keys:
        if k in gone:
            raise TypeError(f"{owner}({k}=...) is no longer accepted: {gone[k]}")
