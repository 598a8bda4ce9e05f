"""The regime map: MST's gap to dense across training tokens per parameter, as ``benchmarks/regime.py
--package`` fitted it (``regime_map.json``). ``mstc plan`` reads the expected gap of a run off it
(``expected_gap``) and how the defaults fared against the dense model of their average size nearby
(``versus_dense_avg``); ``mstc train`` prints a note at start for a run where MST ends far from dense or
where that smaller dense model ended below it (``regime_note``).
"""
from __future__ import annotations

import json
import math
from importlib import resources

from .config import PRESETS, MSTConfig


def regime_map() -> dict | None:
    """The fit ``benchmarks/regime.py --package`` wrote, or None when the package has none."""
    try:
        text = resources.files("mst_compile").joinpath("regime_map.json").read_text()
    except (FileNotFoundError, OSError):
        return None
    return json.loads(text)


def _measured(config: MSTConfig) -> str | None:
    """Which measured config of the map this one is (ignoring ΔT), None for neither."""
    neutral = dict(update_interval=None)
    return next((name for name in ("default", "paper")
                 if config.replace(**neutral) == MSTConfig(**{**PRESETS[name], **neutral})), None)


def _series_for(config: MSTConfig) -> tuple[str, str]:
    """The map's series to read for this config, and a note."""
    name = _measured(config)
    if name is None:
        return "default", "this config differs from both measured ones; read off the defaults' curve"
    return name, f"this config is the {name} one"


def _nearest(points: list[dict], tokens_per_param: float) -> dict | None:
    return min(points, key=lambda p: abs(math.log(p["tokens_per_param"] / tokens_per_param))) if points else None


def versus_dense_avg(config: MSTConfig, tokens_per_param: float) -> dict | None:
    """The map's measured point nearest ``tokens_per_param`` where the defaults met the dense model of
    their average size: ``tokens_per_param``, ``dense_avg_params``, ``dense_avg_reduction``, MST's gap to
    it by seed (``gaps_pct``, % of its loss) and the ``verdict`` (above / below / mixed). None for a
    config other than the defaults (the map ran that comparison for them only) or a map without it."""
    m = regime_map()
    if m is None or _measured(config) != "default":
        return None
    return _nearest(m["configs"]["default"].get("vs_dense_avg", []), tokens_per_param)


def versus_text(v: dict) -> str:
    """One clause on a ``versus_dense_avg`` point, for `mstc plan` and the start-of-run note."""
    seeds = " / ".join(f"{g:+.1f}%" for g in v["gaps_pct"])
    where = {"above": "the dense model of MST's average size ended below MST at every seed",
             "below": "MST ended below the dense model of its average size at every seed",
             "mixed": "MST and the dense model of its average size came out mixed across seeds"}[v["verdict"]]
    return (f"at {v['tokens_per_param']:,.0f} tokens/param on the map, {where} (MST {seeds}; that model: "
            f"{v['dense_avg_params']:,} parameters, {v['dense_avg_reduction']:.1f}x fewer FLOPs than dense)")


def expected_gap(config: MSTConfig, tokens_per_param: float) -> tuple[float | None, bool, dict]:
    """(gap %, extrapolated?, what it was read from) for a run at ``tokens_per_param``."""
    m = regime_map()
    if m is None:
        return None, True, {"note": "no regime map in this installation (run benchmarks/regime.py --package)"}
    series, note = _series_for(config)
    fit = m["configs"][series]["fit"]
    lo, hi = m["measured_range"]
    info = {"series": series, "measured_range": [lo, hi], "fit": fit, "note": note,
            "within_5pct_at": m["configs"][series]["within_5pct_at"], "source": m["source"],
            "vs_dense_avg": versus_dense_avg(config, tokens_per_param)}
    if fit is None:
        return None, True, {**info, "note": "the map has no fit for this config"}
    return fit["a"] * tokens_per_param ** (-fit["b"]), not lo <= tokens_per_param <= hi, info


def regime_note(config: MSTConfig, tokens_per_param: float) -> str | None:
    """The note ``mstc train`` prints at start for a run where the regime map's fit (read at the nearest end of
    the measured range outside it) has MST more than 5% from dense, or near a point where the dense model of
    MST's average size ended below it at every seed (None when neither, or when there is no map)."""
    m = regime_map()
    if m is None:
        return None
    series, _ = _series_for(config)
    c = m["configs"][series]
    x5, pts, fit = c["within_5pct_at"], c["points"], c["fit"]
    lo, hi = m["measured_range"]
    near = _nearest(pts, tokens_per_param)
    # the fit inside the measured range (not extrapolated for a warning); without a fit, the nearest point
    here = (fit["a"] * min(max(tokens_per_param, lo), hi) ** -fit["b"] if fit is not None
            else None if near is None else near["gap_pct"])
    vs = versus_dense_avg(config, tokens_per_param)
    smaller = "" if vs is None or vs["verdict"] != "above" else f"; {versus_text(vs)}: train that model instead"
    ratio = f"{tokens_per_param:,.1f}" if tokens_per_param >= 1 else f"{tokens_per_param:.2g}"
    if here is None or here <= 5.0 or (x5 is not None and tokens_per_param >= x5):
        return None if not smaller else (f"this run trains {ratio} tokens per parameter{smaller}. "
                                         "`mstc plan` shows the expected gap for a budget")
    seen = "" if near is None else (f" (measured: {near['gap_pct']:+.1f}% at {near['tokens_per_param']:,.0f} tokens/param, "
                                    f"{near['reduction']:.1f}x fewer FLOPs)")
    if x5 is not None:
        where = f"it comes within 5% of dense from about {x5:,.0f} tokens/param" + (
            "" if lo <= x5 <= hi else f" (extrapolated beyond the measured {lo:,.0f}-{hi:,.0f})")
    elif fit is not None and fit["b"] < 0:
        where = f"the gap grows with tokens per parameter across the measured range {lo:,.0f}-{hi:,.0f}"
    else:
        where = f"it stays above 5% across the measured range {lo:,.0f}-{hi:,.0f} tokens/param"
    return (f"this run trains {ratio} tokens per parameter; on the regime map (benchmarks/regime.py) MST "
            f"with the {series} config ends about {here:.0f}% above dense at this ratio by the map's fit{seen}: "
            f"{where}{smaller}. `mstc plan` shows the expected gap for a budget")
