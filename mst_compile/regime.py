"""The regime map: MST's gap to dense across training tokens per parameter, as ``benchmarks/regime.py
--package`` fitted it (``regime_map.json``). ``mstc plan`` reads the expected gap of a run off it
(``expected_gap``), and ``mstc train`` prints a note at start for a run where MST ends far from dense
(``regime_note``).
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


def _series_for(config: MSTConfig) -> tuple[str, str]:
    """Which measured config of the map this one is (ignoring ΔT), and a note."""
    neutral = dict(update_interval=None)
    for name in ("default", "paper"):
        if config.replace(**neutral) == MSTConfig(**{**PRESETS[name], **neutral}):
            return name, f"this config is the {name} one"
    return "default", "this config differs from both measured ones; read off the defaults' curve"


def expected_gap(config: MSTConfig, tokens_per_param: float) -> tuple[float | None, bool, dict]:
    """(gap %, extrapolated?, what it was read from) for a run at ``tokens_per_param``."""
    m = regime_map()
    if m is None:
        return None, True, {"note": "no regime map in this installation (run benchmarks/regime.py --package)"}
    series, note = _series_for(config)
    fit = m["configs"][series]["fit"]
    lo, hi = m["measured_range"]
    info = {"series": series, "measured_range": [lo, hi], "fit": fit, "note": note,
            "within_5pct_at": m["configs"][series]["within_5pct_at"], "source": m["source"]}
    if fit is None:
        return None, True, {**info, "note": "the map has no fit for this config"}
    return fit["a"] * tokens_per_param ** (-fit["b"]), not lo <= tokens_per_param <= hi, info


def regime_note(config: MSTConfig, tokens_per_param: float) -> str | None:
    """The note ``mstc train`` prints at start for a run below the tokens/param where the regime map
    found MST within 5% of dense (None when it is not, or when there is no map)."""
    m = regime_map()
    if m is None:
        return None
    series, _ = _series_for(config)
    c = m["configs"][series]
    x5, pts = c["within_5pct_at"], c["points"]
    if x5 is not None and tokens_per_param >= x5:
        return None
    near = min(pts, key=lambda p: abs(math.log(p["tokens_per_param"] / tokens_per_param))) if pts else None
    seen = "" if near is None else (f" (measured: {near['gap_pct']:+.1f}% at {near['tokens_per_param']:,.0f} tokens/param, "
                                    f"{near['reduction']:.1f}x fewer FLOPs)")
    lo, hi = m["measured_range"]
    where = ("it stays above 5% across the measured range "
             f"{lo:,.0f}-{hi:,.0f} tokens/param" if x5 is None else
             f"it comes within 5% of dense from about {x5:,.0f} tokens/param"
             + ("" if lo <= x5 <= hi else f" (extrapolated beyond the measured {lo:,.0f}-{hi:,.0f})"))
    ratio = f"{tokens_per_param:,.1f}" if tokens_per_param >= 1 else f"{tokens_per_param:.2g}"
    return (f"this run trains {ratio} tokens per parameter; on the regime map (benchmarks/regime.py) MST "
            f"with the {series} config ends further from dense at this ratio{seen}: {where}. "
            "`mstc plan` shows the expected gap for a budget")
