"""Reproduce MST's claim at CPU scale: training FLOPs and final val loss of MST, its ablations and the
sparse-training baselines against the dense model, all trained by ``mst_compile.train.loop.train``.

    PYTHONPATH=. python benchmarks/reproduce.py                  # the full run (3000 steps, hours on 2 cores)
    PYTHONPATH=. python benchmarks/reproduce.py --steps 1000     # shorter, everything else the same
    PYTHONPATH=. python benchmarks/reproduce.py --quick          # CI smoke run (tiny sizes, ~1 minute)
    PYTHONPATH=. python benchmarks/reproduce.py --replot benchmarks/results/results.json   # redraw table + plots
    PYTHONPATH=. python benchmarks/reproduce.py --merge OUT a/results.json b/results.json  # join split runs
    PYTHONPATH=. python benchmarks/reproduce.py --table heldout3000   # one table of benchmarks/README.md (TABLES)

Every method trains the byte-level GPT of examples/tiny_gpt.py on the built-in corpus (the Python
standard library) with the same seed, batches, optimizer and LR schedule. Runs go ``--jobs`` at a
time, one thread each. Writes ``results.json``, ``results.md``, ``loss_vs_flops.png`` and
``gap_vs_params.png`` to ``--out`` (and the run folders plus an ``mstc report`` under ``--work``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import _frontier
from _methods import AFTER_MST, METHODS, ORDER, VARIANTS, mst_config, parse_overrides
from _pool import recorded_recipe, run_pool, same_recipe
from _tables import bar_verdict, markdown, plot_gap, plot_loss_vs_flops

_FINAL_EVAL_KEY = 2**41  # batch keys of the final evaluation: not the trainer's eval or train keys

QUICK = dict(steps=40, d=32, n_layer=2, n_head=2, block_size=32, batch_size=4,
             eval_iters=2, final_eval_iters=4, evals=4, widths=[64])

# The tables of benchmarks/README.md that reproduce.py makes, one command each (--table NAME): the folder
# the README quotes (relative to the repository) and the runs that fill it, as reproduce.py arguments. They
# measured the first defaults (mst_v0), which the sized baselines follow.
# A table of several parts writes each to FOLDER/part-<letter>, then merges them into FOLDER.
_HELDOUT = ["--data", "/usr/share/perl/5.36.0", "--widths", ""]
TABLES = {
    "steps500": ("benchmarks/results", [["--steps", "500", "--eval-iters", "5", "--final-eval-iters", "50",
                                          "--methods", "dense,static,set,rigl,mst_v0,mst_no_sv,mst_no_hsa,mst_grad_grow,dense_eq",
                                          "--size-by", "mst_v0"]]),
    "steps3000": ("benchmarks/results/steps3000", [["--methods", "dense,mst_v0,static,mst_no_sv,dense_eq", "--widths", "", "--size-by", "mst_v0"]]),
    "heldout3000": ("benchmarks/results/heldout3000", [
        [*_HELDOUT, "--methods", "dense,paper,static", "--jobs", "3"],
        [*_HELDOUT, "--methods", "mst_v0,static_eq,dense_eq,dense_narrow,dense_shallow", "--jobs", "5", "--size-by", "mst_v0"],
        [*_HELDOUT, "--methods", "set,rigl", "--jobs", "2"],
    ]),
}


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of every full-length run")
    p.add_argument("--d", type=int, default=128, help="embedding width of the main model")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence T")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (every method without its own --lr-of)")
    p.add_argument("--lr-of", action="append", default=[], metavar="METHOD=LR",
                   help="a method's own peak learning rate (its tuned one, benchmarks/fair.py tune), repeatable")
    p.add_argument("--lr-schedule", choices=("wsd", "cosine"), default="wsd", help="the learning-rate curve of every run")
    p.add_argument("--lr-decay", type=float, default=0.2,
                   help="WSD: the last fraction of every run that decays (the same for every method; MST's restoration by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update-interval", type=int, default=None,
                   help="ΔT of every sparse method (default: each method's own; see benchmarks/_methods.py)")
    p.add_argument("--data", default=None,
                   help="text file or folder to train and evaluate on (default: the built-in corpus); e.g. held-out text")
    p.add_argument("--evals", type=int, default=10, help="evaluations along each run (the curve points)")
    p.add_argument("--eval-iters", type=int, default=10, help="batches per split per evaluation along the run")
    p.add_argument("--final-eval-iters", type=int, default=100, help="val batches of the final evaluation (the table's loss)")
    p.add_argument("--widths", default="256", help="extra widths trained dense + MST for the gap-vs-size plot ('' for none)")
    p.add_argument("--size-by", default="mst", metavar="METHOD",
                   help="the MST method whose FLOPs and average size the sized baselines (dense_eq, static_eq, "
                        "dense_avg, the smaller dense models) match (default: mst, the defaults; mst_v0: the first defaults)")
    p.add_argument("--methods", default=",".join(ORDER), help=f"comma list from {','.join(METHODS)} (default: all but {','.join(VARIANTS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="MSTConfig override for every MST run (not the static/SET/RigL baselines), e.g. final_sparsity=0.6")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the table, JSON and plots")
    p.add_argument("--work", default=None, help="folder for the run folders (default: runs/reproduce-<time>)")
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run: tiny model, 40 steps")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    else:
        a.widths = [int(w) for w in a.widths.split(",") if w.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.lr_of = dict((k.strip(), float(v)) for k, _, v in (x.partition("=") for x in a.lr_of))
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if a.size_by not in METHODS or METHODS[a.size_by].dense or a.size_by in AFTER_MST:
        p.error(f"--size-by {a.size_by}: expected an MST method, e.g. mst or mst_v0")
    try:
        a.overrides = parse_overrides(a.set)
    except ValueError as e:
        p.error(str(e))
    a.work = Path(a.work or ROOT / "runs" / f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
    return a


# -- one run (in a worker process) -----------------------------------------------------------
def _model_file(spec: dict):
    """A ModelFile whose model() is examples/tiny_gpt.py's GPT at the spec's sizes."""
    from mst_compile.modelfile import ModelFile

    gpt = _frontier.gpt_class()
    sizes = dict(block_size=spec["block_size"], n_layer=spec["n_layer"], n_head=spec["n_head"], n_embd=spec["d"])
    return ModelFile(_frontier.GPT_FILE, SimpleNamespace(model=lambda: gpt(**sizes))), gpt, sizes


def spec_config(spec: dict):
    """The MSTConfig the run of ``spec`` trains (a dense method's is unused: ``MSTConfig()``)."""
    return mst_config(METHODS[spec["method"]], spec["steps"], spec["update_interval"], spec["overrides"], spec.get("sized"))


def run_one(spec: dict) -> dict:
    """Train one method with the trainer, then evaluate its final weights on ``final_eval_iters`` val batches.

    A benchmark stopped part-way picks up where it was: a run folder with a summary is only evaluated,
    one with a checkpoint is resumed (resuming is exact; its ``wall_s`` leaves out the steps redone)."""
    from mst_compile.train.loop import train
    from mst_compile.train.options import TrainConfig

    method = METHODS[spec["method"]]
    mf, _, _ = _model_file(spec)
    steps = spec["steps"]
    tc = TrainConfig(steps=steps, batch_size=spec["batch_size"], block_size=spec["block_size"], lr=spec["lr"],
                     lr_schedule=spec.get("lr_schedule", "wsd"), lr_decay=spec.get("lr_decay", 0.2),
                     seed=spec["seed"], eval_interval=max(1, steps // spec["evals"]), eval_iters=spec["eval_iters"],
                     log_interval=spec.get("log_interval") or max(1, steps // 100), device="cpu", dense=method.dense,
                     data=spec.get("data"))
    cfg = spec_config(spec)
    out = Path(spec["out"])
    if not method.dense:
        same_recipe(out, cfg)
    if (out / "summary.json").is_file():  # finished before the benchmark was stopped: only its record is missing
        return {**final_record(spec, cfg, json.loads((out / "summary.json").read_text())), "resumed": True}
    if (out / "checkpoints" / "last.pt").is_file():  # stopped mid-run: continue it from its last checkpoint
        return {**final_record(spec, cfg, train(mf, out=None, resume=out, progress=False)), "resumed": True}
    if out.is_dir():  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(out)
    summary = train(mf, tc, cfg, out=out, progress=False)
    return final_record(spec, cfg, summary)


def final_record(spec: dict, cfg, summary: dict) -> dict:
    """The table's record of a finished run: its final weights evaluated on ``final_eval_iters`` val batches."""
    import torch

    from mst_compile.modelfile import parameter_count
    from mst_compile.train.data import load_data
    from mst_compile.train.loop import lm_loss
    from mst_compile.train.metrics import read_jsonl
    from mst_compile.train.options import TrainConfig

    method = METHODS[spec["method"]]
    _, gpt, sizes = _model_file(spec)
    steps, out = spec["steps"], Path(spec["out"])
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    # masked weights are exactly 0 after every step, so the plain model with the saved weights is the
    # trained sparse model; a run that ended with sparse attention is evaluated with that attention
    model = gpt(**sizes)
    model.load_state_dict(torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"])
    patterns = train_rows[-1].get("attention") or {}
    net = model
    if any(p != "dense" for p in patterns.values()):
        import mst_compile

        net = mst_compile.sparsify(model, cfg)  # shares the trained weights
        net.mst.set_attention(patterns)
    net.eval()
    data = load_data(spec.get("data"), None, TrainConfig.val_fraction)
    losses = []
    with torch.no_grad():
        for k in range(spec["final_eval_iters"]):
            x, y = data.batch("val", (_FINAL_EVAL_KEY, k, 0), spec["batch_size"], spec["block_size"], 0)  # every seed, the same batches
            losses.append(lm_loss(net(x), y).item())
    params = parameter_count(model)
    sparse = sum(model.get_parameter(n).numel() for n in summary.get("final_densities", {}))
    densities = [r["density"] for r in train_rows]  # the density each logged step trained with
    return {
        "name": spec["name"], "method": method.key, "label": method.label, "note": method.note, "d": spec["d"],
        "lr": spec["lr"], "lr_schedule": spec.get("lr_schedule", "wsd"), "lr_decay": spec.get("lr_decay", 0.2), "seed": spec["seed"],
        "n_layer": spec["n_layer"], "n_head": spec["n_head"], "sized": spec.get("sized"), "params": params, "steps": steps,
        "val_loss": sum(losses) / len(losses),
        "trainer_val_loss": summary["val_loss"], "train_loss": summary["train_loss"],
        "mst_flops": summary["mst_flops"], "dense_flops": summary["dense_flops"],
        "dense_flops_per_step": summary["dense_flops"] / steps, "final_density": train_rows[-1]["density"],
        "sparse_params": sparse, "avg_active_params": params - sparse + sparse * sum(densities) / len(densities),
        "wall_s": summary["wall_s"], "out": str(out), "mst_config": cfg.to_dict() if not method.dense else None,
        "val_batches": losses,
        "curve": [{"step": r["step"], "flops": r["mst_flops"], "val_loss": r["val_loss"]}
                  for r in rows if r.get("kind") == "eval"],
    }


# -- the whole benchmark ---------------------------------------------------------------------
def _spec(a, method: str, d: int, steps: int | None = None, n_layer: int | None = None, n_head: int | None = None,
          sized: dict | None = None) -> dict:
    name = method if d == a.d or method in AFTER_MST else f"{method}@d{d}"
    lr = getattr(a, "lr_of", {}).get(method, a.lr)
    return dict(name=name, method=method, d=d, steps=steps or a.steps, n_layer=n_layer or a.n_layer,
                n_head=n_head or a.n_head, block_size=a.block_size, batch_size=a.batch_size, lr=lr, seed=a.seed,
                lr_schedule=getattr(a, "lr_schedule", "wsd"), lr_decay=getattr(a, "lr_decay", 0.2),
                update_interval=a.update_interval, evals=a.evals, eval_iters=a.eval_iters, data=a.data,
                final_eval_iters=a.final_eval_iters, overrides=a.overrides, sized=sized, out=str(a.work / name))


def _equal_flops_steps(mst: dict) -> int:
    """Dense steps whose FLOPs (same tokens per step) match MST's ledger total."""
    return max(1, round(mst["mst_flops"] / mst["dense_flops_per_step"]))


def sized_by_mst(a, mst: dict) -> list[dict]:
    """The runs sized from MST's FLOP total: dense at equal FLOPs (fewer steps), static sparse at the
    sparsity of equal FLOPs, and the smaller dense models trained for all the steps."""
    tokens = a.steps * a.batch_size * a.block_size
    budget = mst["mst_flops"] / tokens  # MST's FLOPs per training token
    specs = []
    if "dense_eq" in a.methods:
        specs.append(_spec(a, "dense_eq", a.d, _equal_flops_steps(mst)))
    if "static_eq" in a.methods:
        s = _frontier.static_sparsity_for(budget, a.n_layer, a.d, a.block_size)
        specs.append(_spec(a, "static_eq", a.d, sized={"sparsity": round(s, 4)}))
    for method, depth, width, heads in _frontier.frontier(budget, a.n_layer, a.n_head, a.block_size):
        if method in a.methods:
            specs.append(_spec(a, method, width, n_layer=depth, n_head=heads))
    if "dense_avg" in a.methods:  # the dense model of MST's average active parameter count (Jin et al. 2025)
        width, heads = _frontier.width_for_params(mst["avg_active_params"], a.n_layer, a.n_head, a.block_size)
        specs.append(_spec(a, "dense_avg", width, n_head=heads))
    return specs


def run_all(a) -> list[dict]:
    from mst_compile.train.data import load_data

    load_data(a.data, None, 0.05)  # tokenize the corpus once before the workers read it
    a.work.mkdir(parents=True, exist_ok=True)
    # the headline pair first, then the long wide runs (they bound the wall time), then the rest
    first = [m for m in ("dense", a.size_by) if m in a.methods]
    specs = [_spec(a, m, a.d) for m in first]
    specs += [_spec(a, m, w) for w in a.widths for m in ("dense", a.size_by)]
    specs += [_spec(a, m, a.d) for m in a.methods if m not in first and m not in AFTER_MST]
    if any(m in AFTER_MST for m in a.methods):  # sized by MST's predicted budget, with or without the MST run
        predicted = predict_mst_flops(a)
        a.predicted_mst_flops = predicted["mst_flops"]
        specs += sized_by_mst(a, predicted)  # sized up front: they run beside MST, not after it
    return [r for _, r in run_pool(specs, a.jobs, run_one)]


def predict_mst_flops(a) -> dict:
    """MST's ledger totals for the full run, from the same schedule trained at batch 1.

    The ledger charges every sparse weight and attention site per row of its input, and the masks,
    patterns and dense-gradient steps follow the schedule alone, so the totals scale exactly with the
    batch: the batch-1 run's totals times ``batch_size`` are the full run's (checked in the table)."""
    spec = {**_spec(a, a.size_by, a.d), "batch_size": 1, "evals": 1, "eval_iters": 1, "final_eval_iters": 1,
            "log_interval": 1, "out": str(a.work / f"{a.size_by}_flops_batch1")}
    done = Path(spec["out"]) / "record.json"
    cfg = spec_config(spec)
    r = json.loads(done.read_text()) if done.is_file() else None  # a rerun into the same --work: that run finished
    if r is None or recorded_recipe(r) != cfg:  # none yet, or one of another recipe (before the defaults changed)
        shutil.rmtree(spec["out"], ignore_errors=True)
        r = run_one(spec)
        done.write_text(json.dumps(r))
    scale = a.batch_size
    return {**r, "mst_flops": r["mst_flops"] * scale, "dense_flops": r["dense_flops"] * scale,
            "dense_flops_per_step": r["dense_flops_per_step"] * scale}


def write_outputs(doc: dict, out: Path) -> None:
    """The markdown table and the two plots of a results document."""
    plot_loss_vs_flops(doc["runs"], doc["setup"]["d"], out / "loss_vs_flops.png")
    plot_gap(doc["runs"], out / "gap_vs_params.png")
    (out / "results.md").write_text(markdown(doc))


_SAME = ("steps", "d", "n_layer", "n_head", "block_size", "batch_size", "lr", "lr_schedule", "lr_decay", "seed", "update_interval", "evals",
         "eval_iters", "final_eval_iters", "overrides", "quick", "data")


def merge(out: Path, parts: list[Path], command: str, alone: bool = False) -> dict:
    """Join results.json files of the same setup into one table and plot set. A run named in more
    than one part is taken from the last part that has it (a rerun replaces the earlier run). The
    table records the parts' commands, then ``command`` (``alone``: only ``command``, which ran them)."""
    docs = [json.loads(p.read_text()) for p in parts]
    if not docs:
        raise SystemExit("--merge OUT a.json b.json ...: give the results.json files to join")
    for p, d in zip(parts[1:], docs[1:]):
        diff = [k for k in _SAME if d["setup"].get(k) != docs[0]["setup"].get(k)]
        if diff:
            raise SystemExit(f"--merge: {p} was run with a different setup ({', '.join(diff)}) than {parts[0]}")
    by_name: dict[str, dict] = {}
    for p, d in zip(parts, docs):
        for r in d["runs"]:
            if r["name"] in by_name:
                print(f"--merge: {r['name']} from {p} replaces the earlier run")
            by_name[r["name"]] = r
    runs = list(by_name.values())
    setup = {**docs[0]["setup"], "widths": sorted({w for d in docs for w in d["setup"]["widths"]})}
    cmds = [] if alone else [c for d in docs for c in (d["command"] if isinstance(d["command"], list) else [d["command"]])]
    doc = {"command": cmds + [command], "setup": setup, "wall_s": sum(d["wall_s"] for d in docs),
           "bar": bar_verdict(runs, setup["d"]), "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_outputs(doc, out)
    print(markdown(doc))
    return doc


def _command(argv) -> str:
    return "PYTHONPATH=. python benchmarks/reproduce.py" + "".join(" " + shlex.quote(x) for x in argv)


def table(name: str, command: str) -> dict:
    """Every run of the README table ``name`` (``TABLES``), merged into the folder the README quotes."""
    if name not in TABLES:
        raise SystemExit(f"--table {name!r}: expected one of {', '.join(TABLES)}")
    folder, parts = TABLES[name]
    if len(parts) == 1:
        return run(_args([*parts[0], "--out", str(ROOT / folder), "--work", str(ROOT / "runs" / name)]), command)
    done = []
    for i, part in enumerate(parts):
        out, work = f"{folder}/part-{chr(ord('a') + i)}", f"runs/{name}/part-{chr(ord('a') + i)}"
        run(_args([*part, "--out", str(ROOT / out), "--work", str(ROOT / work)]), _command([*part, "--out", out, "--work", work]))
        done.append(ROOT / out / "results.json")
    return merge(ROOT / folder, done, command, alone=True)


def run(a: argparse.Namespace, command: str) -> dict:
    """Train every run of ``a`` and write the table, JSON and plots to ``a.out`` (``command`` is recorded)."""
    t0 = time.time()
    results = run_all(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(a, k) for k in ("steps", "d", "n_layer", "n_head", "block_size", "batch_size", "lr", "lr_of", "lr_schedule",
                                        "lr_decay", "seed", "size_by",
                                        "update_interval", "widths", "evals", "eval_iters", "final_eval_iters", "jobs", "quick",
                                        "data")}
    setup["overrides"] = {k: v for k, v in a.overrides.items()}
    setup["predicted_mst_flops"] = getattr(a, "predicted_mst_flops", None)
    doc = {"command": command, "setup": setup, "wall_s": time.time() - t0,
           "bar": bar_verdict(results, a.d), "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_outputs(doc, out)
    try:  # the mstc report of every run (sparsity, attention, per-layer density) next to the run folders
        from mst_compile.train.report import write_report

        write_report([r["out"] for r in results], a.work / "report")
    except Exception as e:  # the extra report never costs the benchmark its table
        print(f"mstc report skipped: {type(e).__name__}: {e}")
    print(markdown(doc))
    print(f"wrote {out}/results.{{md,json}}, loss_vs_flops.png, gap_vs_params.png; runs in {a.work}")
    return doc


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--replot"]:  # redraw the table and plots of an earlier run: --replot results.json
        doc = json.loads(Path(argv[1]).read_text())
        write_outputs(doc, Path(argv[1]).parent)
        return doc
    if argv[:1] == ["--merge"]:  # one table from runs split over invocations: --merge OUT a.json b.json ...
        return merge(Path(argv[1]), [Path(x) for x in argv[2:]], _command(argv))
    if argv[:1] == ["--table"]:  # one table of benchmarks/README.md, every part run and merged: --table NAME
        if len(argv) != 2:
            raise SystemExit(f"--table takes one NAME ({', '.join(TABLES)}) and no other options, got {argv[1:]}")
        return table(argv[1], _command(argv))
    return run(_args(argv), _command(argv))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
