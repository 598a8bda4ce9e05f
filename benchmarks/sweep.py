"""Sweep MST's defaults against the dense baseline of a reproduce.py run: gap vs FLOP reduction.

    PYTHONPATH=. python benchmarks/sweep.py --baseline benchmarks/results/results.json \\
        --variant "s_max 0.8: sparsity=0.8" --variant "late: ultra_end=0.6; drop_fraction=0.3,0.3,0" [--jobs 2]

Each ``--variant "NAME: KEY=VALUE; KEY=VALUE"`` trains MST once with those MSTConfig overrides at the
baseline run's exact setup (sizes, steps, seed, ΔT, evaluation batches), so its final val loss is
paired with the baseline's dense and dense-at-equal-FLOPs runs. Writes ``sweep.md``, ``sweep.json``
and ``sweep.png`` (gap to dense against FLOP reduction, with the bar) next to the baseline.
``--equal-flops`` also trains the dense model on each variant's FLOP budget (LR schedule fitted).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce
from _methods import parse_overrides
from _pool import run_pool
from _tables import GAP_BAR, REDUCTION_BAR, _find, _plt, gap_pct, paired_se_pct


def _variants(items: list[str]) -> list[tuple[str, dict]]:
    out = []
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--variant {item!r}: expected 'NAME: KEY=VALUE; KEY=VALUE'")
        out.append((name.strip(), parse_overrides([p.strip() for p in rest.split(";") if p.strip()]) if rest.strip() else {}))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="results.json of a reproduce.py run (its dense and dense_eq runs)")
    p.add_argument("--variant", action="append", default=[], help="'NAME: KEY=VALUE; ...' (repeatable)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--equal-flops", action="store_true", help="also train the dense model at each variant's FLOPs")
    p.add_argument("--out", default=None, help="folder for sweep.{md,json,png} (default: next to --baseline)")
    p.add_argument("--work", default=None, help="folder for the run folders (default: runs/sweep-<time>)")
    p.add_argument("--replot", action="store_true", help="only redraw sweep.png from the sweep.json next to --baseline")
    a = p.parse_args(argv)
    base_path = Path(a.baseline)
    if a.replot:
        out = Path(a.out) if a.out else base_path.parent
        base, doc = json.loads(base_path.read_text()), json.loads((out / "sweep.json").read_text())
        d = base["setup"]["d"]
        mst, dense, eq = (_find(base["runs"], m, d) for m in ("mst", "dense", "dense_eq"))
        _plot([("MST run of the baseline file", mst)] + [(r["name"], r) for r in doc["runs"]], base["runs"], dense, eq, out / "sweep.png")
        return doc
    base = json.loads(base_path.read_text())
    setup = base["setup"]
    d = setup["d"]
    dense, eq, mst = (_find(base["runs"], m, d) for m in ("dense", "dense_eq", "mst"))
    if dense is None:
        raise SystemExit(f"{base_path} has no dense run at d={d}")
    work = Path(a.work or reproduce.ROOT / "runs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(**{**setup, "work": work, "evals": setup.get("evals", 10), "eval_iters": setup.get("eval_iters", 5),
                               "data": setup.get("data")})
    specs = []
    for name, over in _variants(a.variant):
        ns.overrides = {**setup.get("overrides", {}), **over}
        s = reproduce._spec(ns, "mst", d)
        s.update(name=name, out=str(work / name.replace(" ", "_").replace(":", "")))
        specs.append(s)
    def dense_eq(s: dict, r: dict) -> list[dict]:  # the dense model on this variant's FLOP budget, LR schedule fitted
        if not a.equal_flops or s["method"] == "dense_eq":
            return []
        e = reproduce._spec(ns, "dense_eq", d, reproduce._equal_flops_steps(r))
        e.update(name=f"{s['name']} dense_eq", variant=s["name"], out=s["out"] + "_dense_eq")
        return [e]

    t0 = time.time()
    rows, eqs = [], {}
    for s, r in run_pool(specs, a.jobs, reproduce.run_one, then=dense_eq):
        if s["method"] == "dense_eq":
            eqs[s["variant"]] = r
            continue
        r["overrides"] = dict(s["overrides"])
        rows.append(r)
    order = [s["name"] for s in specs]
    rows.sort(key=lambda r: order.index(r["name"]))
    for r in rows:
        r["dense_eq"] = eqs.get(r["name"])
    doc = {"baseline": str(base_path), "setup": setup, "wall_s": time.time() - t0, "runs": rows}
    out = Path(a.out) if a.out else base_path.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    ref = [("MST run of the baseline file", mst)] if mst else []
    lines = [f"### Sweep of MST settings ({setup['steps']} steps, d={d}; gaps paired with the dense run of {base_path.name})", "",
             "| variant | overrides | final val loss | gap to dense | FLOP reduction | vs dense at the same FLOPs |", "|---|---|---|---|---|---|"]
    for name, r in ref + [(r["name"], r) for r in rows]:
        se = paired_se_pct(r, dense)
        own_eq = eq if r is mst else r.get("dense_eq")
        vs_eq = f"{gap_pct(r, own_eq):+.2f}% ({own_eq['steps']} steps)" if own_eq else "-"
        over = ", ".join(f"{k}={v}" for k, v in (r.get("overrides") or {}).items()) or "defaults"
        lines.append(f"| {name} | {over} | {r['val_loss']:.4f} | {gap_pct(r, dense):+.2f}%{'' if se is None else f' ± {se:.2f}'} | "
                     f"{dense['mst_flops'] / r['mst_flops']:.2f}x | {vs_eq} |")
    lines += ["", f"Command: `PYTHONPATH=. python benchmarks/sweep.py {' '.join(repr(x) if ' ' in x else x for x in (argv or sys.argv[1:]))}` "
              f"({doc['wall_s'] / 60:.1f} min)", ""]
    (out / "sweep.md").write_text("\n".join(lines))
    _plot(ref + [(r["name"], r) for r in rows], base["runs"], dense, eq, out / "sweep.png")
    print("\n".join(lines))
    return doc


def _plot(points, base_runs, dense, eq, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in points:
        x, y = dense["mst_flops"] / r["mst_flops"], gap_pct(r, dense)
        ax.plot(x, y, "D", color="C3")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for r in base_runs:  # the baselines of the main table, for context
        if r["d"] == dense["d"] and r["method"] not in ("dense", "mst"):
            x, y = dense["mst_flops"] / r["mst_flops"], gap_pct(r, dense)
            ax.plot(x, y, "o", color="0.5")
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color="0.4")
    ax.axhline(GAP_BAR, color="k", ls="--", lw=1, label=f"{GAP_BAR:g}% gap")
    ax.axvline(REDUCTION_BAR, color="k", ls=":", lw=1, label=f"{REDUCTION_BAR:g}x reduction")
    ax.margins(x=0.12)
    ax.set_xlabel("training FLOP reduction vs dense")
    ax.set_ylabel("final val loss gap to dense (%)")
    ax.set_title("MST settings: gap vs FLOP reduction (the bar is the lower right corner)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
