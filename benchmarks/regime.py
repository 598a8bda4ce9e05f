"""Where MST pays off: the gap to dense across training tokens per parameter (the regime map).

    PYTHONPATH=. python benchmarks/regime.py              # the map: 5 points, tokens/param 16 → 2000 (~1 h on 2 cores)
    PYTHONPATH=. python benchmarks/regime.py --family fixed   # one model (d=32) trained 16 → 1000 tokens/param
    PYTHONPATH=. python benchmarks/regime.py --quick      # CI smoke run (2 tiny points, about a minute)
    PYTHONPATH=. python benchmarks/regime.py --replot benchmarks/results/regime/regime.json

The published 4× comes from a run of about 2,400 training tokens per parameter; the main benchmark
runs at about 15. Here a family of byte-level GPTs (examples/tiny_gpt.py) on the built-in corpus
spans that range by shrinking the model and lengthening training. At every point the same seed,
batches and evaluation train:

- ``dense``: the model, all the steps;
- ``mst``: MST with the defaults (``MSTConfig()``);
- ``paper``: MST with ``MSTConfig.preset("paper")``;
- ``dense_eq``: the same dense model for as many steps as MST's FLOPs buy (LR schedule fitted);
- ``dense_avg``: the dense model (same depth) whose parameter count is MST's average active parameter
  count over the run, trained for all the steps (Jin et al. 2025's line).

Every run trains on the same learning-rate curve (``--lr-schedule``, WSD by default, decaying over the
last 20% of each run).

The gap (final val loss vs dense, %) of each MST run is fitted by ``gap = a · r^(−b)`` (least squares
in log-log over the points with a positive gap, r = tokens/param), which says where MST reaches a
5% and a 1% gap, or that it does not within the measured range. Writes ``regime.json`` (every run),
``regime.md`` and ``regime.png`` to ``--out``, results as each run finishes; ``--package`` also
writes the fit that ``mstc plan`` reads (``mst_compile/regime_map.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import _frontier  # noqa: E402
import reproduce  # noqa: E402
from _tables import _plt, gap_pct  # noqa: E402

PACKAGE_MAP = ROOT / "mst_compile" / "regime_map.json"
BLOCK, BATCH = 64, 64  # 4096 tokens per step at every point
# (width, layers, heads, target tokens/param). "shrink": smaller models trained longer (the map);
# "fixed": one model (d=32) trained longer, which separates more tokens per parameter from less width
FAMILIES = {"shrink": [(64, 2, 2, 16), (48, 2, 2, 64), (32, 2, 2, 250), (24, 2, 2, 1000), (16, 2, 2, 2000)],
            "fixed": [(32, 2, 2, 16), (32, 2, 2, 64), (32, 2, 2, 250), (32, 2, 2, 1000)]}
QUICK_POINTS = [(32, 1, 2, 0.2), (8, 1, 2, 2)]
METHODS = ("dense", "mst", "paper", "dense_eq", "dense_avg")


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (every run)")
    p.add_argument("--lr-schedule", choices=("wsd", "cosine"), default="wsd", help="the learning-rate curve of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-eval-iters", type=int, default=50, help="val batches of the final evaluation")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="shrink",
                   help="shrink: smaller models trained longer (the map); fixed: the d=32 model trained longer")
    p.add_argument("--out", default=None, help="default: benchmarks/results/regime (fixed: regime-fixed)")
    p.add_argument("--work", default=None, help="run folders, a finished run is reused (default: runs/regime[-fixed])")
    p.add_argument("--package", action="store_true", help=f"also write the fit to {PACKAGE_MAP.relative_to(ROOT)} (shrink family)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: two tiny points, a few dozen steps")
    a = p.parse_args(argv)
    a.points, a.block, a.batch = (QUICK_POINTS, 16, 8) if a.quick else (FAMILIES[a.family], BLOCK, BATCH)
    suffix = "" if a.family == "shrink" else f"-{a.family}"
    a.work = Path(a.work or ROOT / "runs" / f"regime{suffix}")
    a.out = Path(a.out or ROOT / "benchmarks" / "results" / f"regime{suffix}")
    return a


def _spec(a, point: dict, method: str, steps: int) -> dict:
    name = f"{point['name']}/{method}"
    return dict(name=name, method=method, d=point["d"], steps=steps, n_layer=point["n_layer"], n_head=point["n_head"],
                block_size=a.block, batch_size=a.batch, lr=a.lr, lr_schedule=a.lr_schedule, lr_decay=0.2, seed=a.seed,
                update_interval=None, evals=10, log_interval=1 if method == "mst" else None,
                eval_iters=5 if not a.quick else 1, data=None, final_eval_iters=a.final_eval_iters if not a.quick else 2,
                overrides={}, sized=None, out=str(a.work / name), point=point["name"])


def plan_points(a) -> list[dict]:
    out = []
    for d, L, h, target in a.points:
        n = _frontier.params(L, d, a.block)
        steps = max(8, round(target * n / (a.block * a.batch)))
        out.append(dict(name=f"d{d}L{L}" if a.family == "shrink" else f"d{d}L{L}-{steps}", d=d, n_layer=L, n_head=h, params=n, steps=steps,
                        tokens=steps * a.block * a.batch, tokens_per_param=steps * a.block * a.batch / n))
    return out


def _run(spec: dict) -> dict:
    """Train one run, or read back a run that already finished in its folder."""
    out = Path(spec["out"])
    done = out / "summary.json"
    if done.is_file() and (out / "checkpoints" / "last.pt").is_file():
        summary = json.loads(done.read_text())
        if summary.get("steps") == spec["steps"]:
            method = reproduce.METHODS[spec["method"]]
            cfg = reproduce.mst_config(method, spec["steps"], None, {}, None)
            return {**reproduce.final_record(spec, cfg, summary), "point": spec["point"]}
    return {**reproduce.run_one(spec), "point": spec["point"]}


def run_all(a, points: list[dict]) -> list[dict]:
    from mst_compile.train.data import load_data

    load_data(None, None, 0.05)  # tokenize the corpus once before the workers read it
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    by_name = {p["name"]: p for p in points}
    specs = [_spec(a, p, m, p["steps"]) for p in sorted(points, key=lambda p: -p["steps"]) for m in ("mst", "paper", "dense")]
    def sized(s: dict, r: dict) -> list[dict]:  # the dense models on MST's FLOPs and of its average size, once known
        if s["method"] != "mst":
            return []
        p = by_name[s["point"]]
        width, heads = _frontier.width_for_params(r["avg_active_params"], p["n_layer"], p["n_head"], a.block)
        return [_spec(a, p, "dense_eq", reproduce._equal_flops_steps(r)),
                {**_spec(a, {**p, "d": width, "n_head": heads}, "dense_avg", p["steps"])}]

    results, t0 = [], time.time()
    for _, r in reproduce.run_pool(specs, a.jobs, _run, sized):
        results.append(r)
        write(a, points, results, time.time() - t0)  # results as they go
    return results


# -- the map ---------------------------------------------------------------------------------
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


def crossing(fit: dict | None, gap: float) -> float | None:
    """The tokens/param where the fitted gap falls to ``gap`` (%), None when the fit does not fall."""
    if fit is None or fit["b"] <= 0:
        return None
    return (fit["a"] / gap) ** (1.0 / fit["b"])


def summarize(points: list[dict], results: list[dict]) -> dict:
    """Per point the four runs' figures; per MST method the fit and where it crosses 5% and 1%."""
    rows, series = [], {"mst": [], "paper": [], "dense_eq": [], "dense_avg": []}
    for p in points:
        got = {r["method"]: r for r in results if r["point"] == p["name"]}
        dense = got.get("dense")
        row = {**p, "runs": {}}
        for m, r in got.items():
            row["runs"][m] = {"val_loss": r["val_loss"], "steps": r["steps"], "mst_flops": r["mst_flops"],
                              "wall_s": r["wall_s"], "final_density": r["final_density"],
                              "gap_pct": None if dense is None else gap_pct(r, dense),
                              "reduction": None if dense is None else dense["mst_flops"] / r["mst_flops"]}
            if dense is not None and m in series:
                series[m].append((p["tokens_per_param"], gap_pct(r, dense), dense["mst_flops"] / r["mst_flops"]))
        rows.append(row)
    lo = min(p["tokens_per_param"] for p in points)
    hi = max(p["tokens_per_param"] for p in points)
    fits = {}
    for m, pts in series.items():
        fit = fit_power_law([x for x, _, _ in pts], [g for _, g, _ in pts])
        fits[m] = {"fit": fit, "points": [{"tokens_per_param": x, "gap_pct": g, "reduction": red} for x, g, red in pts],
                   "within_5pct_at": crossing(fit, 5.0), "within_1pct_at": crossing(fit, 1.0)}
    return {"measured_range": [lo, hi], "points": rows, "series": fits}


def _r(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _where(x: float | None, lo: float, hi: float) -> str:
    if x is None:
        return "is not reached (the fitted gap grows with tokens/param)"
    where = "inside" if lo <= x <= hi else "outside (extrapolated from)"
    return f"≈ {_r(x)} tokens/param, {where} the measured range"


def markdown(doc: dict) -> str:
    s, lo, hi = doc["summary"], *doc["summary"]["measured_range"]
    family = " one model trained longer," if "--family fixed" in doc["command"] else ""
    lines = [f"### When does MST pay off? ({family} built-in corpus)".replace("( ", "(") + (" (quick smoke run)" if doc["setup"]["quick"] else ""), "",
             f"Byte-level GPTs, T={doc['setup']['block']}, batch {doc['setup']['batch']}, lr {doc['setup']['lr']:g} on "
             f"{doc['setup'].get('lr_schedule', 'cosine')} for every run, seed "
             f"{doc['setup']['seed']}; final val loss on {doc['setup']['final_eval_iters']} val batches; gap to the dense run of the "
             "same point; FLOP reduction is algorithmic (the ledger), wall time is measured.", "",
             "| model | params | steps | tokens/param | dense | MST defaults (gap, reduction) | paper preset (gap, reduction) "
             "| dense at MST's FLOPs (gap) | dense of MST's average size (gap, reduction) | wall time dense / MST |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in s["points"]:
        r = p["runs"]

        def cell(m, red=True, r=r):
            x = r.get(m)
            if x is None or x["gap_pct"] is None:
                return "-"
            return f"{x['val_loss']:.4f} ({x['gap_pct']:+.1f}%" + (f", {x['reduction']:.2f}x)" if red else ")")
        dense = r.get("dense")
        dense_loss = "-" if dense is None else f"{dense['val_loss']:.4f}"
        wall = f"{dense['wall_s'] / 60:.1f} / {r['mst']['wall_s'] / 60:.1f} min" if dense and r.get("mst") else "-"
        lines.append(f"| d={p['d']}, L={p['n_layer']} | {p['params'] / 1e3:.1f}k | {p['steps']} | {_r(p['tokens_per_param'])} | "
                     f"{dense_loss} | {cell('mst')} | {cell('paper')} | {cell('dense_eq', False)} | {cell('dense_avg')} | {wall} |")
    lines.append("")
    for m, label in (("mst", "MST defaults"), ("paper", "paper preset")):
        f = s["series"][m]
        fit = f["fit"]
        law = "no fit (fewer than two positive gaps)" if fit is None else f"gap ≈ {fit['a']:.3g} · r^({-fit['b']:+.3f})%"
        lines.append(f"- {label}: {law}; ≤ 5% gap {_where(f['within_5pct_at'], lo, hi)}; ≤ 1% gap "
                     f"{_where(f['within_1pct_at'], lo, hi)}.")
    lines += ["", f"Command: `{doc['command']}` ({doc['wall_s'] / 60:.0f} min).", ""]
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
    """The part ``mstc plan`` reads: per MST config (defaults, paper) the fit and the measured points."""
    s = doc["summary"]
    return {"source": doc["command"], "corpus": "built-in (Python standard library, bytes)",
            "measured_range": s["measured_range"],
            "configs": {name: {"fit": s["series"][m]["fit"], "points": s["series"][m]["points"],
                               "within_5pct_at": s["series"][m]["within_5pct_at"],
                               "within_1pct_at": s["series"][m]["within_1pct_at"]}
                        for name, m in (("default", "mst"), ("paper", "paper"))}}


def write(a, points: list[dict], results: list[dict], wall_s: float) -> dict:
    doc = {"command": "PYTHONPATH=. python benchmarks/regime.py" + (" --quick" if a.quick else "")
           + ("" if a.family == "shrink" else f" --family {a.family}"),
           "setup": {"block": a.block, "batch": a.batch, "lr": a.lr, "lr_schedule": a.lr_schedule, "seed": a.seed, "quick": a.quick,
                     "final_eval_iters": a.final_eval_iters if not a.quick else 2, "points": points},
           "wall_s": wall_s, "runs": results, "summary": summarize(points, results)}
    (a.out / "regime.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.out / "regime.md").write_text(markdown(doc))
    return doc


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--replot"]:
        path = Path(argv[1])
        doc = json.loads(path.read_text())
        doc["summary"] = summarize(doc["setup"]["points"], doc["runs"])
        path.write_text(json.dumps(doc, indent=1) + "\n")
        (path.parent / "regime.md").write_text(markdown(doc))
        plot(doc, path.parent / "regime.png")
        if "--package" in argv:
            PACKAGE_MAP.write_text(json.dumps(package_map(doc), indent=1) + "\n")
        print(markdown(doc))
        return doc
    a = _args(argv)
    points = plan_points(a)
    for p in points:
        print(f"{p['name']}: {p['params']:,} params, {p['steps']} steps, {p['tokens_per_param']:,.0f} tokens/param", flush=True)
    t0 = time.time()
    results = run_all(a, points)
    doc = write(a, points, results, time.time() - t0)
    plot(doc, a.out / "regime.png")
    if a.package and a.family == "shrink" and not a.quick:
        PACKAGE_MAP.write_text(json.dumps(package_map(doc), indent=1) + "\n")
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
