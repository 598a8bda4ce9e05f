"""Where MST pays off: the gap to dense across training tokens per parameter (the regime map).

    PYTHONPATH=. python benchmarks/regime.py              # the map: 5 points, tokens/param 16 → 2000, fair rules (~2.7 h on 2 cores)
    PYTHONPATH=. python benchmarks/regime.py --lrs 2e-3 --seeds 0 --out benchmarks/results/regime-one-lr   # one LR, one seed (~40 min)
    PYTHONPATH=. python benchmarks/regime.py --family fixed   # one model (d=32) trained 16 → 1000 tokens/param
    PYTHONPATH=. python benchmarks/regime.py --quick      # CI smoke run (2 tiny points, 2 LRs, 2 seeds)
    PYTHONPATH=. python benchmarks/regime.py --replot benchmarks/results/regime/regime.json

The published 4× comes from a run of about 2,400 training tokens per parameter; the main benchmark
runs at about 15. Here a family of byte-level GPTs (examples/tiny_gpt.py) on the built-in corpus
spans that range by shrinking the model and lengthening training. At every point the same batches and
evaluation train:

- ``dense``: the model, all the steps;
- ``mst``: MST with the defaults (``MSTConfig()``);
- ``paper``: MST with ``MSTConfig.preset("paper")``;
- ``dense_eq``: the same dense model for as many steps as MST's FLOPs buy (LR schedule fitted);
- ``dense_avg``: the dense model (same depth) whose parameter count is MST's average active parameter
  count over the run, trained for all the steps (Jin et al. 2025's line).

The fair rules of ``fair.py``: every run on the same learning-rate curve (``--lr-schedule``, WSD by
default, decaying over the last 20% of each run); every method of every point tries each peak LR of
``--lrs`` at the first seed of ``--seeds`` (the same budget for all; a method whose best is the grid's
largest or smallest LR gets an octave more, until its best is inside) and runs at its best one at the
other seeds; gaps are paired by seed, and a method is said to end below another only where it does at
every seed.

The mean gap (final val loss vs dense, %) of each MST config is fitted by ``gap = a · r^(−b)`` (least
squares in log-log over the points with a positive gap, r = tokens/param), which says where MST reaches
a 5% and a 1% gap, or that it does not within the measured range. Writes ``regime.json`` (every run),
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
import _pool  # noqa: E402
import reproduce  # noqa: E402
from _regime_summary import chosen_runs, crossing, fit_power_law, markdown, package_map, plot, summarize  # noqa: E402, F401
from _tables import shown_path  # noqa: E402

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
    p.add_argument("--lrs", default=None, help="peak learning rates each method tries at every point (default 1e-3,2e-3,4e-3,8e-3; "
                   "--quick: 2e-3,4e-3)")
    p.add_argument("--lr-schedule", choices=("wsd", "cosine"), default="wsd", help="the learning-rate curve of every run")
    p.add_argument("--seeds", default=None, help="training seeds: the first picks each method's LR, the rest rerun it at that LR "
                   "(default 0,1,2; --quick: 0,1)")
    p.add_argument("--final-eval-iters", type=int, default=50, help="val batches of the final evaluation")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="shrink",
                   help="shrink: smaller models trained longer (the map); fixed: the d=32 model trained longer")
    p.add_argument("--out", default=None, help="default: benchmarks/results/regime (fixed: regime-fixed)")
    p.add_argument("--work", default=None, help="run folders, a finished run is reused (default: runs/regime[-fixed])")
    p.add_argument("--package", action="store_true", help=f"also write the fit to {PACKAGE_MAP.relative_to(ROOT)} (shrink family)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: two tiny points, a few dozen steps")
    p.add_argument("--reuse", default="", metavar="METHOD,...",
                   help="take these methods' runs (dense, paper: they do not depend on MST's defaults) from the --out "
                        "file of the same setup instead of training them again, e.g. after a change of the defaults")
    p.add_argument("--widths", dest="only", default=None, metavar="W,...", help="only the family's points of these widths, e.g. 64,48 (default: all)")
    a = p.parse_args(argv)
    a.points, a.block, a.batch = (QUICK_POINTS, 16, 8) if a.quick else (FAMILIES[a.family], BLOCK, BATCH)
    if a.only:
        widths = sorted({pt[0] for pt in a.points})
        try:
            wanted = {int(x) for x in a.only.split(",") if x.strip()}
        except ValueError:
            wanted = set()
        if not wanted or not wanted <= set(widths):
            p.error(f"--widths {a.only}: expected some of {','.join(map(str, widths))} (the {a.family} family's widths)")
        a.points = [pt for pt in a.points if pt[0] in wanted]
        if a.package:
            p.error("--package writes the whole map's fit for mstc plan; run every point (drop --widths)")
    a.lrs = a.lrs or ("2e-3,4e-3" if a.quick else "1e-3,2e-3,4e-3,8e-3")
    a.seeds = a.seeds or ("0,1" if a.quick else "0,1,2")
    try:
        a.lrs = sorted({float(x) for x in a.lrs.split(",") if x.strip()})
        a.seeds = list(dict.fromkeys(int(x) for x in a.seeds.split(",") if x.strip()))
    except ValueError:
        p.error(f"--lrs {a.lrs!r} / --seeds {a.seeds!r}: expected comma-separated numbers, e.g. --lrs 1e-3,2e-3 --seeds 0,1,2")
    if not a.lrs or not a.seeds or min(a.lrs) <= 0:
        p.error("--lrs and --seeds need at least one value each, the learning rates above 0")
    a.reuse = [m for m in a.reuse.split(",") if m.strip()]
    if not set(a.reuse) <= {"dense", "paper"}:
        p.error(f"--reuse {','.join(a.reuse)}: expected some of dense,paper (the others are sized from the MST defaults' runs)")
    suffix = ("" if a.family == "shrink" else f"-{a.family}") + (f"-w{a.only.replace(',', '-')}" if a.only else "")  # a subset never overwrites the map
    a.work = Path(a.work or ROOT / "runs" / f"regime{suffix}")
    default_out = ROOT / "benchmarks" / "results" / f"regime{suffix}"
    a.out_flag = "" if a.out is None or Path(a.out).resolve() == default_out else f" --out {shown_path(a.out)}"
    a.out = Path(a.out or default_out)
    return a


def _spec(a, point: dict, method: str, steps: int, lr: float, seed: int) -> dict:
    name = f"{point['name']}/{method}/lr{lr:g}/s{seed}"
    return dict(name=name, method=method, d=point["d"], steps=steps, n_layer=point["n_layer"], n_head=point["n_head"],
                block_size=a.block, batch_size=a.batch, lr=lr, lr_schedule=a.lr_schedule, lr_decay=0.2, seed=seed,
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
            cfg = reproduce.spec_config(spec)
            if not method.dense:
                _pool.same_recipe(out, cfg)
            return {**reproduce.final_record(spec, cfg, summary), "point": spec["point"]}
    from mst_compile.train.loop import TrainingDiverged

    try:
        return {**reproduce.run_one(spec), "point": spec["point"]}
    except TrainingDiverged as e:  # a diverged run is a result (an infinite loss), not the end of the map
        return {k: spec[k] for k in ("name", "method", "d", "lr", "seed", "steps", "point")} | {
            "val_loss": math.inf, "mst_flops": math.nan, "dense_flops": math.nan, "wall_s": 0.0, "final_density": math.nan,
            "diverged": str(e).splitlines()[0]}


def reused_runs(a, points: list[dict]) -> list[dict]:
    """The ``--reuse`` methods' runs from the last map at ``--out``, which must have this setup; a paper-preset run
    must also have today's preset (a run of another recipe would be reported as this one)."""
    if not a.reuse:
        return []
    path = a.out / "regime.json"
    if not path.is_file():
        raise SystemExit(f"--reuse {','.join(a.reuse)}: {shown_path(path)} does not exist; run without --reuse")
    doc = json.loads(path.read_text())
    setup = {"block": a.block, "batch": a.batch, "lrs": a.lrs, "lr_schedule": a.lr_schedule, "seeds": a.seeds,
             "final_eval_iters": a.final_eval_iters if not a.quick else 2, "points": points}
    if differ := [k for k, v in setup.items() if doc["setup"].get(k) != v]:
        raise SystemExit(f"--reuse: {shown_path(path)} ran another setup ({', '.join(differ)} differ); run without --reuse")
    runs = [{**r, "reused_from": doc.get("reused_from") or doc["command"]} for r in doc["runs"] if r["method"] in a.reuse]
    for r in runs:
        if r["method"] == "paper" and _pool.recorded_recipe(r) != reproduce.mst_config(
                reproduce.METHODS["paper"], r["steps"], None, {}, None):
            raise SystemExit(f"--reuse paper: run {r['name']} of {shown_path(path)} trained another recipe than today's "
                             "paper preset; run without --reuse")
    return runs


def run_all(a, points: list[dict]) -> list[dict]:
    """Every method at every LR at the first seed, then each at its best LR at the other seeds."""
    from mst_compile.train.data import load_data

    load_data(None, None, 0.05)  # tokenize the corpus once before the workers read it
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    by_name = {p["name"]: p for p in points}
    longest = sorted(points, key=lambda p: -p["steps"])
    results, t0 = reused_runs(a, points), time.time()
    reused = {r["name"] for r in results}

    def sized_spec(p: dict, mst: dict, method: str, lr: float, seed: int) -> dict:
        """The dense model on MST's FLOPs or of its average size, sized by an MST run of point ``p``."""
        if method == "dense_eq":
            return _spec(a, p, "dense_eq", reproduce._equal_flops_steps(mst), lr, seed)
        width, heads = _frontier.width_for_params(mst["avg_active_params"], p["n_layer"], p["n_head"], a.block)
        return _spec(a, {**p, "d": width, "n_head": heads}, "dense_avg", p["steps"], lr, seed)

    def pool(specs: list[dict], lr_of=None) -> None:
        def sized(s: dict, r: dict) -> list[dict]:  # the sized baselines follow each MST run, once its ledger is known
            if lr_of is None or s["method"] != "mst" or "diverged" in r:
                return []
            p = by_name[s["point"]]
            return [sized_spec(p, r, m, lr_of(p, m, s["lr"]), s["seed"]) for m in ("dense_eq", "dense_avg")]

        for _, r in _pool.run_pool([s for s in specs if s["name"] not in reused], a.jobs, _run, sized):
            results.append(r)
            write(a, points, results, time.time() - t0)  # results as they go

    # 1. the screen: every method at every LR, first seed (the sized baselines at the LR of the MST run they follow)
    pool([_spec(a, p, m, p["steps"], lr, a.seeds[0]) for p in longest for lr in a.lrs for m in ("mst", "paper", "dense")],
         lambda p, m, lr: lr)
    # fair.py's rule: a method whose best is the largest (smallest) LR it tried gets twice (half) that LR, until inside
    while edges := [(key, c) for key, c in chosen_runs(results).items() if c["edge"] and math.isfinite(c["screen"][c["lr"]])]:
        specs = []
        for (name, m), c in edges:
            tried, p = sorted(c["screen"]), by_name[name]
            lr = 2 * tried[-1] if c["lr"] == tried[-1] else tried[0] / 2
            if m in ("dense_eq", "dense_avg"):
                mst = next(r for r in results if r["point"] == name and r["method"] == "mst" and "diverged" not in r)
                specs.append(sized_spec(p, mst, m, lr, a.seeds[0]))
            else:
                specs.append(_spec(a, p, m, p["steps"], lr, a.seeds[0]))
        pool(specs)
    # 2. the other seeds, each method at its own best LR
    best = {key: c["lr"] for key, c in chosen_runs(results).items()}
    if a.seeds[1:]:
        pool([_spec(a, p, m, p["steps"], best[(p["name"], m)], s) for s in a.seeds[1:] for p in longest
              for m in ("mst", "paper", "dense")], lambda p, m, lr: best[(p["name"], m)])
    return results


def write(a, points: list[dict], results: list[dict], wall_s: float) -> dict:
    doc = {"command": "PYTHONPATH=. python benchmarks/regime.py" + (" --quick" if a.quick else "")
           + ("" if a.family == "shrink" else f" --family {a.family}") + (f" --widths {a.only}" if a.only else "") + a.out_flag
           + f" --lrs {','.join(f'{x:g}' for x in a.lrs)} --seeds {','.join(map(str, a.seeds))}"
           + (f" --reuse {','.join(a.reuse)}" if a.reuse else ""),
           "setup": {"block": a.block, "batch": a.batch, "lrs": a.lrs, "lr_schedule": a.lr_schedule, "seeds": a.seeds,
                     "quick": a.quick,
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
        for r in doc["runs"]:  # a map from before the LR screen: one LR and seed, in its setup
            r.setdefault("lr", doc["setup"].get("lr")), r.setdefault("seed", doc["setup"].get("seed", 0))
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
    with _pool.workers(a.jobs):  # one set of workers for the screen, its widening and the other seeds
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
