"""The reproduction's verdict, markdown table and plots, from the per-run records of reproduce.py."""
from __future__ import annotations

import math
from pathlib import Path

_ORDER = ("dense", "paper", "mst", "mst_v0", "mst_no_sv", "mst_no_hsa", "mst_grad_grow", "static",
          "static_eq", "set", "rigl", "dense_eq", "dense_avg", "dense_narrow", "dense_shallow")
_SIZED = ("dense_narrow", "dense_shallow", "dense_avg")  # baselines of the main table at another size
REDUCTION_BAR = 4.0  # MST must cut training FLOPs at least this much, and then ...
EQ_BAR = 20.0  # ... end at least this many % below the same dense model trained for MST's FLOPs,
GAP_BAR = 20.0  # ... within this many % of the full dense run (a target),
PUBLISHED_GAP = 1.0  # (the published claim: within 1%)
ROOT = Path(__file__).resolve().parents[1]


def shown_path(path) -> str:
    """A path as the tables and recorded commands show it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _find(results: list[dict], method: str, d: int) -> dict | None:
    return next((r for r in results if r["method"] == method and (r["d"] == d or method in _SIZED)), None)


def _lead(results: list[dict]) -> str:
    """The MST run the verdict and the gap plot are about: the defaults, or the first defaults in a table of those."""
    return "mst" if any(r["method"] == "mst" for r in results) else "mst_v0"


def _main(results: list[dict], d: int) -> list[dict]:
    """The runs of the main table: the main model's, and the smaller dense models sized against it."""
    rows = [r for r in results if r["d"] == d or r["method"] in _SIZED]
    return sorted(rows, key=lambda r: _ORDER.index(r["method"]) if r["method"] in _ORDER else 99)


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
    """The quality bar: MST (defaults) at >= 4x fewer FLOPs ends below static 90% sparse training and
    >= 20% below the same dense model trained for MST's FLOPs; targets: within 20% of dense and below
    the smaller dense models of equal FLOPs."""
    dense, mst = _find(results, "dense", d), _find(results, _lead(results), d)
    if dense is None or mst is None:
        return {"met": None, "why": "dense and mst runs are both needed"}
    v = {"reduction": dense["mst_flops"] / mst["mst_flops"], "gap_pct": gap_pct(mst, dense),
         "gap_se_pct": paired_se_pct(mst, dense)}
    v["reduction_ok"] = v["reduction"] >= REDUCTION_BAR
    v["gap_ok"] = v["gap_pct"] <= GAP_BAR
    v["published_gap_ok"] = v["gap_pct"] <= PUBLISHED_GAP
    checks = [v["reduction_ok"]]
    for key, method in (("vs_equal_flops", "dense_eq"), ("vs_static", "static"), ("vs_static_eq", "static_eq"),
                        ("vs_narrow", "dense_narrow"), ("vs_shallow", "dense_shallow"), ("vs_paper", "paper")):
        other = _find(results, method, d)
        if other is not None:
            v[f"{key}_pct"] = gap_pct(mst, other)  # negative: MST ends below that baseline
            v[f"{key}_se_pct"] = paired_se_pct(mst, other)
    if "vs_equal_flops_pct" in v:
        v["beats_equal_flops"] = v["vs_equal_flops_pct"] <= -EQ_BAR
        checks.append(v["beats_equal_flops"])
    if "vs_static_pct" in v:
        v["beats_static"] = v["vs_static_pct"] < 0
        checks.append(v["beats_static"])
    smaller = [v[k] for k in ("vs_narrow_pct", "vs_shallow_pct") if k in v]
    if smaller:
        v["beats_smaller_dense"] = all(x < 0 for x in smaller)
    v["met"] = bool(all(checks) and len(checks) == 3)
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
            f"{s['steps']} steps, seed {s['seed']}, "
            + (f"ΔT = {s['update_interval']} for every sparse method" if s.get("update_interval") else
               "each method's own ΔT (MST defaults: Schedule.interval; paper, SET, RigL: steps/30)")
            + (f", data {s['data']}" if s.get("data") else ", built-in corpus") + "; final val loss on "
            f"{s['final_eval_iters']} val batches (the same for every method; ± is the paired standard error of the gap).")
    lines = [f"### MST vs dense, {s['steps']} steps" + (" (quick smoke run)" if s.get("quick") else ""), "", head, "",
             "| method | steps | final val loss | gap to dense | training FLOPs | FLOP reduction | density of the last step | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in _main(results, d):
        gap = "-" if dense is None or r is dense else f"{gap_pct(r, dense):+.2f}%{_se(paired_se_pct(r, dense))}"
        red = "-" if dense is None else f"{dense['mst_flops'] / r['mst_flops']:.2f}x"
        label = r["label"]
        if r["method"] in _SIZED:
            heads = f", {r['n_head']} heads" if r.get("n_head") not in (None, s["n_head"]) else ""
            label += f" (d={r['d']}, {r.get('n_layer', s['n_layer'])} layers{heads}, {r['params'] / 1e6:.2f}M)"
        elif r.get("sized"):
            label += " (" + ", ".join(f"{k}={val}" for k, val in r["sized"].items()) + ")"
        lines.append(f"| {label} | {r['steps']} | {r['val_loss']:.4f} | {gap} | {_human(r['mst_flops'])} | {red} | "
                     f"{r['final_density']:.2f} | {_dur(r['wall_s'])} |")
    wide = sorted({r["d"] for r in results if r["method"] not in _SIZED})
    if len(wide) > 1:
        lines += ["", "MST vs dense by model size (same depth, heads, tokens and steps):", "",
                  "| width d | parameters | dense val loss | MST val loss | gap | FLOP reduction |", "|---|---|---|---|---|---|"]
        for w in wide:
            dn, ms = _find(results, "dense", w), _find(results, _lead(results), w)
            if dn and ms:
                lines.append(f"| {w} | {dn['params'] / 1e6:.2f}M | {dn['val_loss']:.4f} | {ms['val_loss']:.4f} | "
                             f"{gap_pct(ms, dn):+.2f}%{_se(paired_se_pct(ms, dn))} | {dn['mst_flops'] / ms['mst_flops']:.2f}x |")
    v = doc["bar"]
    if v.get("met") is not None:
        def rel(key: str, what: str) -> str:
            return f"{v[key + '_pct']:+.2f}%{_se(v.get(key + '_se_pct'))} vs {what}" if key + "_pct" in v else ""
        parts = [p for p in (rel("vs_static", "static 90%"), rel("vs_equal_flops", "dense at equal FLOPs"),
                             rel("vs_narrow", "the narrower dense model"), rel("vs_shallow", "the shallower dense model"),
                             rel("vs_paper", "the paper preset")) if p]
        lines += ["", f"Bar (≥ {REDUCTION_BAR:g}x fewer FLOPs, below static 90%, ≥ {EQ_BAR:g}% below dense at equal FLOPs): "
                  f"**{'met' if v['met'] else 'not met'}**. MST (defaults): {v['reduction']:.2f}x reduction, gap to dense "
                  f"{v['gap_pct']:+.2f}%{_se(v['gap_se_pct'])} (target ≤ {GAP_BAR:g}%: {'met' if v['gap_ok'] else 'missed'})"
                  + ("; " + "; ".join(parts) if parts else "") + "."]
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
          "rigl": ("C2", "-", "<"), "mst": ("C3", "-", "D"), "mst_v0": ("C8", "-", "d"), "mst_no_sv": ("C4", ":", "x"),
          "mst_no_hsa": ("C5", ":", "+"), "mst_grad_grow": ("C9", ":", "*"), "paper": ("C6", "-", "P"),
          "static_eq": ("C7", "--", "v"), "dense_narrow": ("0.45", "-.", "o"), "dense_shallow": ("0.45", ":", "o"),
          "dense_avg": ("C0", "-", "o")}


def plot_loss_vs_flops(results: list[dict], d: int, path: Path) -> None:
    """Val loss against cumulative training FLOPs (the ledger's), every method of the main model on one chart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in _main(results, d):
        color, ls, marker = _STYLE.get(r["method"], ("C8", "-", "."))
        c = r["curve"]
        ax.plot([p["flops"] for p in c], [p["val_loss"] for p in c], ls=ls, marker=marker, color=color, ms=5, lw=1.4,
                label=f"{r['label']}: {r['val_loss']:.3f}")
        ax.plot([r["mst_flops"]], [r["val_loss"]], marker=marker, color=color, ms=11, mfc="none", mew=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs (algorithmic, the ledger's count)")
    ax.set_ylabel("val loss (cross-entropy, nats/byte)")
    ax.set_title(f"val loss vs training FLOPs, d={d} (large open marker: final evaluation)")
    ax.grid(alpha=0.3, which="both")
    finals = [r["val_loss"] for r in _main(results, d)]
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
        dn, ms = _find(results, "dense", w), _find(results, _lead(results), w)
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
