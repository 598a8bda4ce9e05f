"""Fair comparisons: every method on one learning-rate curve, each at its own tuned peak LR, at several seeds.

    PYTHONPATH=. python benchmarks/fair.py tune                  # LR x schedule screening, 500 steps, built-in corpus
    PYTHONPATH=. python benchmarks/fair.py confirm               # the headline: 3000 steps, 3 seeds, held-out text
    PYTHONPATH=. python benchmarks/fair.py confirm --replot      # redraw the table from results.json

``tune`` trains every method (dense, MST defaults, the paper preset, static sparse at MST's FLOPs, RigL,
dense at MST's FLOPs and the smaller dense models, including the one of MST's average parameter count)
at each peak LR of ``--lrs`` under each schedule of ``--schedules`` on the built-in corpus, seed 0 (``--seed``), and
picks, per schedule, each method's best LR (lowest final val loss). A method whose best is the
largest (smallest) LR it has tried gets one more run at twice (half) that LR, until every best is inside
its grid: one rule for every method. The schedule of the headline is
the one under which most methods reach their lowest loss (WSD on a tie); every method then trains on it.

``confirm`` trains the headline methods at their tuned LR on that one schedule, at ``--seeds``, on the
held-out text (the GNU C++ standard library headers, ``/usr/include/c++``, named before any run and
never used for a decision), and reports the mean and the spread across seeds; a claim that one
method ends below another is made only where it holds at every seed.

Both write their JSON after every finished run and skip the runs it already holds, so an interrupted
benchmark continues where it stopped. Runs go ``--jobs`` at a time, one thread each.
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

import reproduce
from _fair_tables import confirm_markdown, pick, tune_markdown
from _pool import recorded_recipe, run_pool, workers
from _tables import shown_path

RESULTS = ROOT / "benchmarks" / "results" / "fair"
HELD_OUT = "/usr/include/c++"  # chosen before any run: a language and library this project never trained on
TUNED = ("dense", "mst", "paper", "static_eq", "rigl", "dense_eq", "dense_avg", "dense_narrow", "dense_shallow")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # the model flags (--d, --n-layer, ...) pass through to reproduce.py
    p.add_argument("what", choices=("tune", "confirm"))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (tune: 500, confirm: 3000)")
    p.add_argument("--methods", default=",".join(TUNED))
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3", help="tune: the peak learning rates")
    p.add_argument("--schedules", default="wsd,cosine", help="tune: the learning-rate curves")
    p.add_argument("--seeds", default="0,1,2", help="confirm: the training seeds")
    p.add_argument("--data", default=None, help=f"confirm: the held-out text (default {HELD_OUT}); tune: the built-in corpus")
    p.add_argument("--tuned", default=str(RESULTS / "tune500" / "results.json"), help="confirm: the tune results to read LRs from")
    p.add_argument("--no-widen", dest="widen", action="store_false",
                   help="tune: do not add an octave beyond the grid for methods whose best LR is at its edge")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--first", default="", help="confirm: methods to run first, at all their seeds, in this order "
                   "(e.g. mst,dense_avg), so a session that ends early has the comparisons that matter at every seed")
    p.add_argument("--out", default=None, help="folder for the JSON and the table (default benchmarks/results/fair/<what><steps>)")
    p.add_argument("--work", default=None, help="run folders (default runs/fair-<what><steps>)")
    p.add_argument("--replot", action="store_true", help="only rewrite the table from the JSON")
    a, rest = p.parse_known_args(argv)
    a.argv = argv
    a.steps = a.steps or (500 if a.what == "tune" else 3000)
    a.out = Path(a.out or RESULTS / f"{a.what}{a.steps}")
    a.work = a.work or str(ROOT / "runs" / f"fair-{a.what}{a.steps}")
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    # the model, batch and evaluation of reproduce.py (d=128, 4 layers, T=128, batch 32, 100 final val batches)
    a.base = reproduce._args(["--steps", str(a.steps), "--widths", "", "--methods", ",".join(a.methods), "--work", a.work,
                              "--jobs", str(a.jobs), *(["--data", a.data or HELD_OUT] if a.what == "confirm" else []), *rest])
    return a


def _safe_run(spec: dict) -> dict:
    """One run; a run that diverges is a result (an infinite loss), not the end of the benchmark, and
    one that fails otherwise is an error record, so the runs already finished are still saved."""
    from mst_compile.train.loop import TrainingDiverged

    failed = {"name": spec["name"], "method": spec["method"], "d": spec["d"], "lr": spec["lr"], "seed": spec["seed"],
              "lr_schedule": spec["lr_schedule"], "steps": spec["steps"], "mst_flops": math.nan, "dense_flops": math.nan, "wall_s": 0.0}
    try:
        return reproduce.run_one(spec)
    except TrainingDiverged as e:
        return {**failed, "val_loss": math.inf, "diverged": str(e).splitlines()[0]}
    except Exception as e:  # any other failure: reported, left out of the table, tried again by the next invocation
        return {**failed, "val_loss": math.nan, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": []}


def _save(doc: dict, out: Path, render) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(render(doc))


def _commands(doc: dict, argv: list[str]) -> list[str]:
    """The commands that wrote ``doc``, this one added: a later invocation may add methods to the same file."""
    this = f"PYTHONPATH=. python benchmarks/fair.py {' '.join(argv)}".strip()
    before = doc.get("command", [])
    before = [before] if isinstance(before, str) else before
    return before + ([this] if this not in before else [])


def _strip(r: dict) -> dict:
    """A run record without the per-batch losses (kept: they pair the gaps) and with what the tables read."""
    return {k: v for k, v in r.items() if k not in ("note",)}


def _recipe(spec: dict):
    return None if reproduce.METHODS[spec["method"]].dense else reproduce.spec_config(spec)


def _what(r: dict, recipe) -> tuple:
    """What a run trained: its recipe and model size and length (a sized baseline follows the MST it was sized by)."""
    return recipe, r["d"], r["n_layer"], r["steps"]


def _key(r: dict) -> tuple:
    return r["name"], r["lr"], r["lr_schedule"]


def _pool(a, specs: list[dict], doc: dict, render) -> dict:
    """Train the specs not yet in ``doc``; a run of the same name at another LR (a confirm after a new tune) is
    trained again and its record replaces the old one, which moves to ``doc["superseded"]``."""
    done = {_key(r): _what(r, recorded_recipe(r)) for r in doc["runs"]}
    # a record of another recipe or size under this name (e.g. written before the defaults changed) is trained again
    todo = [s for s in specs if done.get(_key(s)) != _what(s, _recipe(s))]
    print(f"{len(specs) - len(todo)} of {len(specs)} runs already in {a.out / 'results.json'}; {len(todo)} to train", flush=True)
    for _, r in run_pool(todo, a.jobs, fn=_safe_run):
        if "error" in r:
            print(f"  {r['name']} failed: {r['error']} (not saved; the next invocation tries it again)", file=sys.stderr, flush=True)
            continue
        old = [x for x in doc["runs"] if x["name"] == r["name"]]
        for x in old:
            print(f"  {r['name']} at {r['lr_schedule']} {r['lr']:g} replaces the run at {x['lr_schedule']} {x['lr']:g} "
                  f"(val {x['val_loss']:.4f})", flush=True)
        doc["runs"] = [x for x in doc["runs"] if x["name"] != r["name"]] + [_strip(r)]
        doc.setdefault("superseded", []).extend(old)  # kept, not lost: the text that quoted them can still be checked
        _save(doc, a.out, render)
    return doc


def _group(a, predicted: dict, schedule: str, lr: float, methods) -> list[dict]:
    base = a.base
    base.lr, base.lr_schedule, base.lr_of = lr, schedule, {}
    group = [reproduce._spec(base, m, base.d) for m in a.methods if m not in reproduce.AFTER_MST]
    group += reproduce.sized_by_mst(base, predicted)
    group = [s for s in group if s["method"] in methods]
    for s in group:
        s["name"] = f"{s['method']}|{schedule}|{lr:g}"
        s["out"] = str(Path(base.work) / s["name"].replace("|", "_"))
    return sorted(group, key=lambda s: -s["d"] * s["n_layer"] * s["steps"])  # long runs first


def _edges(doc: dict, schedules: list[str], methods: list[str]) -> dict[tuple[str, float], list[str]]:
    """{(schedule, lr): methods} one octave beyond the grid, for each method whose best LR is the largest
    (or smallest) it has tried: the same rule for every method, so the grid widens until each best is inside."""
    tried: dict = {}
    for r in doc["runs"]:
        tried.setdefault((r["method"], r["lr_schedule"]), []).append(r)
    out: dict = {}
    for (m, sch), rs in tried.items():
        if sch not in schedules or m not in methods:
            continue
        best = min(rs, key=lambda r: r["val_loss"])
        if not math.isfinite(best["val_loss"]):
            continue
        lrs = sorted(r["lr"] for r in rs)
        if best["lr"] == lrs[-1]:
            out.setdefault((sch, best["lr"] * 2), []).append(m)
        elif best["lr"] == lrs[0]:
            out.setdefault((sch, best["lr"] / 2), []).append(m)
    return out


def tune(a) -> dict:
    lrs = [float(x) for x in a.lrs.split(",")]
    schedules = [s.strip() for s in a.schedules.split(",")]
    base = a.base
    from mst_compile.train.data import load_data

    load_data(base.data, None, 0.05)  # tokenize once before the workers read it
    Path(base.work).mkdir(parents=True, exist_ok=True)
    base.lr_schedule = schedules[0]
    predicted = reproduce.predict_mst_flops(base)  # MST's FLOPs and average size follow the schedule, not the LR
    specs = [s for schedule in schedules for lr in lrs for s in _group(a, predicted, schedule, lr, a.methods)]
    doc = _load(a.out / "results.json")
    known = doc.get("setup", {}).get("schedules", [])
    had = doc.get("setup", {}).get("methods", [])  # a later tune adds methods (e.g. variants) to the same screen
    doc.update(command=_commands(doc, a.argv),
               setup={"steps": a.steps, "lrs": lrs, "schedules": known + [s for s in schedules if s not in known],
                      "methods": had + [m for m in a.methods if m not in had], "d": base.d,
                      "n_layer": base.n_layer, "n_head": base.n_head, "block_size": base.block_size,
                      "batch_size": base.batch_size, "lr_decay": base.lr_decay, "final_eval_iters": base.final_eval_iters,
                      "seed": base.seed,
                      "predicted_mst_flops": predicted["mst_flops"], "avg_active_params": predicted["avg_active_params"]})
    doc = _pool(a, specs, doc, tune_markdown)
    while a.widen and (edges := _edges(doc, schedules, a.methods)):
        doc = _pool(a, [s for (sch, lr), ms in edges.items() for s in _group(a, predicted, sch, lr, ms)], doc, tune_markdown)
    return doc


def confirm(a) -> dict:
    if not Path(a.tuned).is_file():
        sys.exit(f"fair.py confirm: --tuned {a.tuned} does not exist; run `fair.py tune` first or pass its results.json")
    tuned = json.loads(Path(a.tuned).read_text())
    schedule, best = pick(tuned)
    base = a.base
    from mst_compile.train.data import load_data

    load_data(base.data, None, 0.05)
    Path(base.work).mkdir(parents=True, exist_ok=True)
    base.lr_schedule, base.lr_of = schedule, {m: best[m] for m in a.methods}
    predicted = reproduce.predict_mst_flops(base)
    specs = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        base.seed = seed
        group = [reproduce._spec(base, m, base.d) for m in a.methods if m not in reproduce.AFTER_MST]
        group += reproduce.sized_by_mst(base, predicted)
        for s in group:
            s["name"] = f"{s['method']}/s{seed}"
            s["out"] = str(Path(base.work) / s["name"].replace("/", "_"))
        specs += sorted(group, key=lambda s: -s["d"] * s["n_layer"] * s["steps"])  # long runs first
    first = [m.strip() for m in a.first.split(",") if m.strip()]
    specs.sort(key=lambda s: first.index(s["method"]) if s["method"] in first else len(first))  # stable: seeds, sizes kept
    doc = _load(a.out / "results.json")
    before = doc.get("setup", {})
    lrs = {**before.get("lrs", {}), **base.lr_of}  # a later confirm adds methods to the same table
    tuned_from = before.get("tuned", {})  # which tune file each method's LR came from
    tuned_from = {m: tuned_from for m in before.get("lrs", {})} if isinstance(tuned_from, str) else tuned_from
    doc.update(command=_commands(doc, a.argv),
               setup={"steps": a.steps, "seeds": a.seeds, "schedule": schedule, "lrs": lrs,
                      "tuned": {**tuned_from, **{m: shown_path(a.tuned) for m in base.lr_of}},
                      "data": base.data, "d": base.d, "n_layer": base.n_layer, "n_head": base.n_head,
                      "block_size": base.block_size, "batch_size": base.batch_size, "lr_decay": base.lr_decay,
                      "final_eval_iters": base.final_eval_iters, "predicted_mst_flops": predicted["mst_flops"],
                      "avg_active_params": predicted["avg_active_params"]})
    return _pool(a, specs, doc, confirm_markdown)


def main(argv=None) -> dict:
    a = _args(list(sys.argv[1:] if argv is None else argv))
    render = tune_markdown if a.what == "tune" else confirm_markdown
    if a.replot:
        if not (a.out / "results.json").is_file():
            sys.exit(f"fair.py --replot: {a.out / 'results.json'} does not exist; run `fair.py {a.what}` first or pass --out")
        doc = _load(a.out / "results.json")
        (a.out / "results.md").write_text(render(doc))
        return doc
    t0 = time.time()
    with workers(a.jobs):  # one set of workers for the screen and each widening round
        doc = tune(a) if a.what == "tune" else confirm(a)
    doc["wall_s"] = doc.get("wall_s", 0.0) + time.time() - t0
    _save(doc, a.out, render)
    print(render(doc))
    return doc


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
