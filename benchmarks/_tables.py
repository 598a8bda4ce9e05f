"""The reproduction's verdict, markdown table and plots, from the per-run records of reproduce.py."""
from __future__ import annotations

import math
from pathlib import Path

_ORDER = ("dense", "static", "set", "rigl", "mst", "mst_no_sv", "mst_no_hsa", "mst_grad_grow", "dense_eq")
REDUCTION_BAR = 4.0  # MST must cut training FLOPs at least this much ...
GAP_BAR = 1.0  # ... with final val loss within this many % of dense


def _find(results: list[dict], method: str, d: int) -> dict | None:
    return next((r for r in results if r["method"] == method and r["d"] == d), None)


def gap_pct(r: dict, base: dict) -> float:
    return 100.0 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]


def paired_se_pct(r: dict, base: dict) -> float | None:
    """Standard error of the gap in %, from the per-batch differences on the same val batches."""
    a, b = r.get("val_batches"), base.get("val_batches")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diff = [x - y for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    var = sum((x - mean) ** 2 for x in diff) / (len(diff) - 1)
    return 100.0 * math.sqrt(var / len(diff)) / base["val_loss"]


def bar_verdict(results: list[dict], d: int) -> dict:
    """Did MST reach >= 4x fewer FLOPs within 1% of dense, and beat dense at equal FLOPs?"""
    dense, mst, eq = _find(results, "dense", d), _find(results, "mst", d), _find(results, "dense_eq", d)
    if dense is None or mst is None:
        return {"met": None, "why": "dense and mst runs are both needed"}
    v = {"reduction": dense["mst_flops"] / mst["mst_flops"], "gap_pct": gap_pct(mst, dense),
         "gap_se_pct": paired_se_pct(mst, dense)}
    v["reduction_ok"] = v["reduction"] >= REDUCTION_BAR
    v["gap_ok"] = v["gap_pct"] <= GAP_BAR
    if eq is not None:
        v["vs_equal_flops_pct"] = gap_pct(mst, eq)  # negative: MST is below dense at equal FLOPs
        v["vs_equal_flops_se_pct"] = paired_se_pct(mst, eq)
        se = v["vs_equal_flops_se_pct"] or 0.0
        v["beats_equal_flops"] = v["vs_equal_flops_pct"] < -max(2 * se, 0.5)  # "clearly": past 2 SE and 0.5%
    v["met"] = bool(v["reduction_ok"] and v["gap_ok"] and v.get("beats_equal_flops", False))
    return v


def _human(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _dur(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _se(x: float | None) -> str:
    return "" if x is None else f" ± {x:.2f}"


def markdown(doc: dict) -> str:
    s, results = doc["setup"], doc["runs"]
    d = s["d"]
    dense = _find(results, "dense", d)
    head = (f"Byte-level GPT (d={d}, {s['n_layer']} layers, {s['n_head']} heads, T={s['block_size']}, batch {s['batch_size']}), "
            f"{s['steps']} steps, seed {s['seed']}, MST update every {s['update_interval']} steps; final val loss on "
            f"{s['final_eval_iters']} val batches (the same for every method; ± is the paired standard error of the gap).")
    lines = [f"### MST vs dense, {s['steps']} steps" + (" (quick smoke run)" if s.get("quick") else ""), "", head, "",
             "| method | steps | final val loss | gap to dense | training FLOPs | FLOP reduction | density of the last step | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    main = sorted((r for r in results if r["d"] == d), key=lambda r: _ORDER.index(r["method"]) if r["method"] in _ORDER else 99)
    for r in main:
        gap = "-" if dense is None or r is dense else f"{gap_pct(r, dense):+.2f}%{_se(paired_se_pct(r, dense))}"
        red = "-" if dense is None else f"{dense['mst_flops'] / r['mst_flops']:.2f}x"
        lines.append(f"| {r['label']} | {r['steps']} | {r['val_loss']:.4f} | {gap} | {_human(r['mst_flops'])} | {red} | "
                     f"{r['final_density']:.2f} | {_dur(r['wall_s'])} |")
    wide = sorted({r["d"] for r in results})
    if len(wide) > 1:
        lines += ["", "MST vs dense by model size (same depth, heads, tokens and steps):", "",
                  "| width d | parameters | dense val loss | MST val loss | gap | FLOP reduction |", "|---|---|---|---|---|---|"]
        for w in wide:
            dn, ms = _find(results, "dense", w), _find(results, "mst", w)
            if dn and ms:
                lines.append(f"| {w} | {dn['params'] / 1e6:.2f}M | {dn['val_loss']:.4f} | {ms['val_loss']:.4f} | "
                             f"{gap_pct(ms, dn):+.2f}%{_se(paired_se_pct(ms, dn))} | {dn['mst_flops'] / ms['mst_flops']:.2f}x |")
    v = doc["bar"]
    if v.get("met") is not None:
        eq = ""
        if "vs_equal_flops_pct" in v:
            eq = (f"; vs dense at equal FLOPs {v['vs_equal_flops_pct']:+.2f}%{_se(v['vs_equal_flops_se_pct'])} "
                  f"({'clearly below' if v['beats_equal_flops'] else 'not clearly below'})")
        lines += ["", f"Bar (≥ {REDUCTION_BAR:g}x fewer FLOPs, within {GAP_BAR:g}% of dense, clearly below dense at equal FLOPs): "
                  f"**{'met' if v['met'] else 'not met'}**. MST: {v['reduction']:.2f}x reduction, gap "
                  f"{v['gap_pct']:+.2f}%{_se(v['gap_se_pct'])}{eq}."]
    cmds = doc["command"] if isinstance(doc["command"], list) else [doc["command"]]
    lines += ["", f"Command{'s' if len(cmds) > 1 else ''}: " + "; then ".join(f"`{c}`" for c in cmds)
              + f" (total wall time {_dur(doc['wall_s'])}, {s['jobs']} runs at a time, one thread each).", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLE = {"dense": ("k", "-", "o"), "dense_eq": ("k", "--", "s"), "static": ("C7", "-", "v"), "set": ("C1", "-", "^"),
          "rigl": ("C2", "-", "<"), "mst": ("C3", "-", "D"), "mst_no_sv": ("C4", ":", "x"),
          "mst_no_hsa": ("C5", ":", "+"), "mst_grad_grow": ("C9", ":", "*")}


def plot_loss_vs_flops(results: list[dict], d: int, path: Path) -> None:
    """Val loss against cumulative training FLOPs (the ledger's), every method of the main model on one chart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in sorted((r for r in results if r["d"] == d), key=lambda r: _ORDER.index(r["method"]) if r["method"] in _ORDER else 99):
        color, ls, marker = _STYLE.get(r["method"], ("C8", "-", "."))
        c = r["curve"]
        ax.plot([p["flops"] for p in c], [p["val_loss"] for p in c], ls=ls, marker=marker, color=color, ms=5, lw=1.4,
                label=f"{r['label']}: {r['val_loss']:.3f}")
        ax.plot([r["mst_flops"]], [r["val_loss"]], marker=marker, color=color, ms=11, mfc="none", mew=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (ledger, DESIGN §6)")
    ax.set_ylabel("val loss (cross-entropy, nats/byte)")
    ax.set_title(f"val loss vs training FLOPs, d={d} (large open marker: final evaluation)")
    ax.grid(alpha=0.3, which="both")
    finals = [r["val_loss"] for r in results if r["d"] == d]
    if finals:  # keep the interesting end of the curves readable; the first evaluations are far above
        lo = min(finals)
        ax.set_ylim(lo - 0.05 * abs(lo), max(finals) + 0.35 * (max(finals) - lo + 0.1))
    ax.legend(fontsize=8, title="method: final val loss", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(results: list[dict], path: Path) -> None:
    """MST's val-loss gap to dense (%) against the dense model's parameter count, with the 1% bar."""
    plt = _plt()
    pts = []
    for w in sorted({r["d"] for r in results}):
        dn, ms = _find(results, "dense", w), _find(results, "mst", w)
        if dn and ms:
            pts.append((dn["params"], gap_pct(ms, dn), paired_se_pct(ms, dn) or 0.0, w, dn["mst_flops"] / ms["mst_flops"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[2 * p[2] for p in pts], fmt="o-", color="C3", capsize=4,
                    label="MST gap to dense (± 2 SE)")
        for p in pts:
            ax.annotate(f"d={p[3]}, {p[4]:.1f}x fewer FLOPs", (p[0], p[1]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(GAP_BAR, color="k", ls="--", lw=1, label=f"{GAP_BAR:g}% bar")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.margins(x=0.3)  # room for the labels of the end points
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the dense model")
    ax.set_ylabel("final val loss gap to dense (%)")
    ax.set_title("MST's gap to dense vs model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
