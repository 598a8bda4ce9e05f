"""The regime map's verdict from its runs: each method at its own best peak LR per point, the gaps to
dense paired by seed, the power-law fit, the markdown table, the plot and the part ``mstc plan`` reads.

A run record carries ``point``, ``method``, ``lr`` and ``seed``. Per (point, method) the best LR is the
one with the lowest final val loss at the tuning seed (the smallest seed the runs have); the other
seeds ran at that LR only. A gap is paired: each seed's run against dense's run of the same seed.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from _tables import _plt, gap_pct

SERIES = ("mst", "paper", "dense_eq", "dense_avg")  # compared with dense at every point


def fit_power_law(xs: list[float], gaps: list[float]) -> dict | None:
    """gap = a · x^(−b) by least squares on (log x, log gap) over the positive gaps; None with < 2."""
    pts = [(math.log(x), math.log(g)) for x, g in zip(xs, gaps) if g > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return {"a": math.exp(my - slope * mx), "b": -slope, "points": len(pts)}


CROSSING_LIMIT = 1e9  # tokens/param beyond which a crossing is "not reached", not a number


def crossing(fit: dict | None, gap: float) -> float | None:
    """The tokens/param where the fitted gap falls to ``gap`` (%), None when the fit does not fall or
    falls so slowly that it would cross beyond ``CROSSING_LIMIT`` (a nearly flat fit: overflow)."""
    if fit is None or fit["b"] <= 0:
        return None
    log_x = math.log(fit["a"] / gap) / fit["b"]
    return None if log_x > math.log(CROSSING_LIMIT) else math.exp(log_x)


def chosen_runs(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (point, method): the best LR at the tuning seed, every LR's loss there, and the runs at the
    best LR by seed."""
    by = defaultdict(list)
    for r in results:
        by[(r["point"], r["method"])].append(r)
    out = {}
    for key, runs in by.items():
        tune_seed = min(r.get("seed", 0) for r in runs)
        screen = {r["lr"]: r["val_loss"] for r in runs if r.get("seed", 0) == tune_seed}
        best = min(screen, key=lambda lr: screen[lr])
        lrs = sorted(screen)
        out[key] = {"lr": best, "screen": screen, "edge": len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                    "by_seed": {r.get("seed", 0): r for r in runs if r["lr"] == best}}
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _verdict(gaps: list[float]) -> str:
    return "above" if all(g > 0 for g in gaps) else "below" if all(g < 0 for g in gaps) else "mixed"


def summarize(points: list[dict], results: list[dict]) -> dict:
    """Per point each method's runs at its best LR (mean and spread over seeds, gaps to dense paired
    by seed); per series the fit of the mean gap and where it crosses 5% and 1%."""
    chosen = chosen_runs(results)
    rows, series = [], {m: [] for m in SERIES}
    for p in points:
        dense = chosen.get((p["name"], "dense"))
        row = {**p, "runs": {}}
        for (point, m), c in sorted(chosen.items()):
            if point != p["name"]:
                continue
            seeds = sorted(c["by_seed"])
            runs = [c["by_seed"][s] for s in seeds]
            losses = [r["val_loss"] for r in runs]
            paired = [s for s in seeds if dense is not None and s in dense["by_seed"]]
            gaps = [gap_pct(c["by_seed"][s], dense["by_seed"][s]) for s in paired]
            d0 = None if not paired else dense["by_seed"][paired[0]]
            row["runs"][m] = {"lr": c["lr"], "lr_at_edge": c["edge"], "screen": c["screen"], "seeds": seeds,
                              "val_losses": losses, "val_loss": _mean(losses), "spread": max(losses) - min(losses),
                              "steps": runs[0]["steps"], "mst_flops": runs[0]["mst_flops"],
                              "wall_s": _mean([r["wall_s"] for r in runs]), "final_density": runs[0]["final_density"],
                              "params": runs[0].get("params"), "avg_active_params": runs[0].get("avg_active_params"),
                              "gaps_pct": gaps, "gap_pct": _mean(gaps) if gaps else None,
                              "reduction": None if d0 is None else d0["mst_flops"] / runs[0]["mst_flops"]}
            if gaps and m in series:
                series[m].append((p["tokens_per_param"], _mean(gaps), row["runs"][m]["reduction"]))
        mst, avg = chosen.get((p["name"], "mst")), chosen.get((p["name"], "dense_avg"))
        if mst and avg:  # MST against the dense model of its average size, seed by seed
            both = sorted(set(mst["by_seed"]) & set(avg["by_seed"]))
            vs = [gap_pct(mst["by_seed"][s], avg["by_seed"][s]) for s in both]
            row["mst_vs_dense_avg"] = {"seeds": both, "gaps_pct": vs, "verdict": _verdict(vs) if vs else None}
        rows.append(row)
    lo = min(p["tokens_per_param"] for p in points)
    hi = max(p["tokens_per_param"] for p in points)
    fits = {}
    for m, pts in series.items():
        fit = fit_power_law([x for x, _, _ in pts], [g for _, g, _ in pts])
        fits[m] = {"fit": fit, "points": [{"tokens_per_param": x, "gap_pct": g, "reduction": red} for x, g, red in pts],
                   "within_5pct_at": crossing(fit, 5.0), "within_1pct_at": crossing(fit, 1.0)}
    return {"measured_range": [lo, hi], "points": rows, "series": fits}


# -- the table -------------------------------------------------------------------------------
def _r(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _where(x: float | None, lo: float, hi: float, fit: dict) -> str:
    if x is None:
        return ("is not reached (the fitted gap grows with tokens/param)" if fit["b"] <= 0 else
                f"is not reached (the fitted gap falls too slowly: not before {CROSSING_LIMIT:.0e} tokens/param)")
    where = "inside" if lo <= x <= hi else "outside (extrapolated from)"
    return f"≈ {_r(x)} tokens/param, {where} the measured range"


def _cell(x: dict | None, reduction: bool = True) -> str:
    """``loss (gap, reduction) @ LR``; with several seeds the mean loss, the mean gap and its range."""
    if x is None or x["gap_pct"] is None:
        return "-"
    g = x["gaps_pct"]
    gap = f"{x['gap_pct']:+.1f}%" + (f" [{min(g):+.1f}, {max(g):+.1f}]" if len(g) > 1 else "")
    red = f", {x['reduction']:.2f}x" if reduction else ""
    return f"{x['val_loss']:.4f} ({gap}{red}) @ {x['lr']:g}" + ("†" if x["lr_at_edge"] else "")


def markdown(doc: dict) -> str:
    s, setup = doc["summary"], doc["setup"]
    lo, hi = s["measured_range"]
    seeds = setup.get("seeds", [setup.get("seed", 0)])
    lrs = setup.get("lrs", [setup.get("lr")])
    family = " one model trained longer," if "--family fixed" in doc["command"] else ""
    tuned = (f"each method at its own best peak LR of {', '.join(f'{x:g}' for x in lrs)} per point (picked at seed "
             f"{seeds[0]}; a best at the grid's edge got an octave more, until inside; † marks one still at the edge)"
             if len(lrs) > 1 else f"lr {lrs[0]:g} (not tuned)")
    seeded = (f"seeds {', '.join(map(str, seeds))}: mean val loss, mean gap to dense paired by seed [its range]"
              if len(seeds) > 1 else f"seed {seeds[0]}")
    lines = [f"### When does MST pay off? ({family} built-in corpus)".replace("( ", "(") + (" (quick smoke run)" if setup["quick"] else ""), "",
             f"Byte-level GPTs, T={setup['block']}, batch {setup['batch']}, {setup.get('lr_schedule', 'cosine')} for every run, "
             f"{tuned}; {seeded}; final val loss on {setup['final_eval_iters']} val batches; FLOP reduction is algorithmic "
             "(the ledger), wall time is measured.", "",
             "| model | params | steps | tokens/param | dense | MST defaults (gap, reduction) | paper preset (gap, reduction) "
             "| dense at MST's FLOPs (gap) | dense of MST's average size (gap, reduction) | MST vs average-size dense, by seed "
             "| wall time dense / MST |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in s["points"]:
        r = p["runs"]
        dense, mst, vs = r.get("dense"), r.get("mst"), p.get("mst_vs_dense_avg")
        dense_cell = "-" if dense is None else f"{dense['val_loss']:.4f} @ {dense['lr']:g}" + ("†" if dense["lr_at_edge"] else "")
        vs_cell = "-" if not vs or not vs["gaps_pct"] else f"{' / '.join(f'{g:+.1f}%' for g in vs['gaps_pct'])} ({vs['verdict']})"
        wall = f"{dense['wall_s'] / 60:.1f} / {mst['wall_s'] / 60:.1f} min" if dense and mst else "-"
        lines.append(f"| d={p['d']}, L={p['n_layer']} | {p['params'] / 1e3:.1f}k | {p['steps']} | {_r(p['tokens_per_param'])} | "
                     f"{dense_cell} | {_cell(mst)} | {_cell(r.get('paper'))} | {_cell(r.get('dense_eq'), False)} | "
                     f"{_cell(r.get('dense_avg'))} | {vs_cell} | {wall} |")
    lines.append("")
    for m, label in (("mst", "MST defaults"), ("paper", "paper preset")):
        f = s["series"][m]
        fit = f["fit"]
        if fit is None:
            lines.append(f"- {label}: no fit (fewer than two points with a positive mean gap), so no crossing either.")
            continue
        lines.append(f"- {label}: gap ≈ {fit['a']:.3g} · r^({-fit['b']:+.3f})% (fitted to the mean gaps); ≤ 5% gap "
                     f"{_where(f['within_5pct_at'], lo, hi, fit)}; ≤ 1% gap {_where(f['within_1pct_at'], lo, hi, fit)}.")
    lines += ["", f"Command: `{doc['command']}` ({doc['wall_s'] / 60:.0f} min).", ""]
    if reused := sorted({r["method"] for r in doc["runs"] if "reused_from" in r}):
        source = next(r["reused_from"] for r in doc["runs"] if "reused_from" in r)
        lines += [f"The {', '.join(reused)} runs are those of an earlier map (`{source}`), taken over by `--reuse`: their "
                  "recipes are unchanged, but their wall times come from that run, not side by side with MST's.", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    s = doc["summary"]
    lo, hi = s["measured_range"]
    for m, label, color in (("mst", "MST defaults", "C3"), ("paper", "MST paper preset", "C0"),
                            ("dense_eq", "dense at MST's FLOPs", "0.5"), ("dense_avg", "dense of MST's average size", "C2")):
        f = s["series"][m]
        xs = [p["tokens_per_param"] for p in f["points"]]
        ax.plot(xs, [p["gap_pct"] for p in f["points"]], "o", color=color, label=label)
        for p in s["points"]:  # the seeds' spread around the mean
            x = p["runs"].get(m)
            if x and len(x["gaps_pct"]) > 1:
                ax.plot([p["tokens_per_param"]] * 2, [min(x["gaps_pct"]), max(x["gaps_pct"])], "-", color=color, lw=1)
        if f["fit"] is not None and m in ("mst", "paper"):
            grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            a, b = f["fit"]["a"], f["fit"]["b"]
            ax.plot(grid, [a * x ** (-b) for x in grid], "-", color=color, lw=1, alpha=0.7,
                    label=f"fit {a:.3g}·r^({-b:+.2f})")
    for p in s["points"]:  # which model each point is
        m = p["runs"].get("mst")
        if m and m["gap_pct"] is not None:
            ax.annotate(f"d={p['d']}", (p["tokens_per_param"], m["gap_pct"]), textcoords="offset points", xytext=(5, -10),
                        fontsize=7, color="C3")
    for g in (5.0, 1.0):
        ax.axhline(g, color="k", ls=":" if g == 1 else "--", lw=0.8, label=f"{g:g}% gap")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per parameter")
    ax.set_ylabel("final val loss gap to dense (%)")
    ax.set_title("MST's gap to dense across the data regime (built-in corpus)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def package_map(doc: dict) -> dict:
    """The part ``mstc plan`` reads: per MST config (defaults, paper) the fit and the measured points, and the
    defaults against the dense model of their average size by seed."""
    s, setup = doc["summary"], doc["setup"]
    out = {"source": doc["command"], "corpus": "built-in (Python standard library, bytes)",
           "rules": {"lr_schedule": setup.get("lr_schedule"), "lrs": setup.get("lrs", [setup.get("lr")]),
                     "seeds": setup.get("seeds", [setup.get("seed", 0)])},
           "measured_range": s["measured_range"],
           "configs": {name: {"fit": s["series"][m]["fit"], "points": s["series"][m]["points"],
                              "within_5pct_at": s["series"][m]["within_5pct_at"],
                              "within_1pct_at": s["series"][m]["within_1pct_at"]}
                       for name, m in (("default", "mst"), ("paper", "paper"))}}
    # the defaults against the dense model of their average size, point by point (what `mstc plan` says to train instead)
    out["configs"]["default"]["vs_dense_avg"] = [
        {"tokens_per_param": p["tokens_per_param"], "dense_avg_params": p["runs"]["dense_avg"]["params"],
         "dense_avg_reduction": p["runs"]["dense_avg"]["reduction"],
         "gaps_pct": p["mst_vs_dense_avg"]["gaps_pct"], "verdict": p["mst_vs_dense_avg"]["verdict"]}
        for p in s["points"] if p.get("mst_vs_dense_avg", {}).get("gaps_pct") and "dense_avg" in p["runs"]]
    return out
