"""benchmarks/fair.py at toy sizes: tune picks one schedule and each method's LR; confirm trains every seed on them."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import mst_compile

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--d", "32", "--n-layer", "2", "--n-head", "2", "--block-size", "32", "--batch-size", "4", "--eval-iters", "1",
        "--final-eval-iters", "2", "--methods", "dense,mst,dense_avg", "--jobs", "2"]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # spawned workers import it by this name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tune_then_confirm_on_one_schedule_at_every_seed(tmp_path, module_env):
    module_env.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    fair = _load("fair")
    tune_out = tmp_path / "tune"
    tuned = fair.main(["tune", "--steps", "16", "--lrs", "1e-3,8e-3", "--schedules", "wsd,cosine", *TINY, "--no-widen",
                       "--seed", "1", "--out", str(tune_out), "--work", str(tmp_path / "w1")])
    assert len(tuned["runs"]) == 3 * 2 * 2  # methods x LRs x schedules
    # --seed reaches every run and the table says which seed screened
    assert tuned["setup"]["seed"] == 1 and {r["seed"] for r in tuned["runs"]} == {1}
    assert "(built-in corpus, seed 1)" in (tune_out / "results.md").read_text()
    from _fair_tables import best_lrs, pick

    schedule, lrs = pick(tuned)
    for m, lr in lrs.items():  # each method's LR is its own best under the picked schedule (an independent argmin)
        mine = [r for r in tuned["runs"] if r["method"] == m and r["lr_schedule"] == schedule]
        assert lr == min(mine, key=lambda r: r["val_loss"])["lr"]
    assert set(best_lrs(tuned)) == {"wsd", "cosine"}
    assert "Schedule for every method" in (tune_out / "results.md").read_text()

    conf = fair.main(["confirm", "--steps", "16", "--seeds", "0,1", "--data", str(ROOT / "examples"), *TINY,
                      "--tuned", str(tune_out / "results.json"), "--out", str(tmp_path / "conf"), "--work", str(tmp_path / "w2")])
    runs = conf["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in ("dense", "mst", "dense_avg") for s in (0, 1))
    for r in runs:
        assert r["lr_schedule"] == schedule and r["lr"] == lrs[r["method"]], r["name"]
    md = (tmp_path / "conf" / "results.md").read_text()
    assert "holds at every seed" in md and "| seed 0 | seed 1 |" in md
    # the JSON is written as runs finish: a second call finds every run and trains none
    saved = json.loads((tmp_path / "conf" / "results.json").read_text())
    assert len(saved["runs"]) == 6
    again = fair.main(["confirm", "--steps", "16", "--seeds", "0,1", "--data", str(ROOT / "examples"), *TINY,
                       "--tuned", str(tune_out / "results.json"), "--out", str(tmp_path / "conf"), "--work", str(tmp_path / "w2")])
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in runs]
    # a variant screened and confirmed later joins the same files: its LR is its own, the others' stay
    more = [*TINY[:-4], "--methods", "mst_lrd1", "--jobs", "2"]
    tuned = fair.main(["tune", "--steps", "16", "--lrs", "1e-3,8e-3", "--schedules", "wsd", *more, "--no-widen",
                       "--out", str(tune_out), "--work", str(tmp_path / "w1")])
    assert tuned["setup"]["methods"] == ["dense", "mst", "dense_avg", "mst_lrd1"] and len(tuned["command"]) == 2
    assert len(tuned["runs"]) == 12 + 2
    conf = fair.main(["confirm", "--steps", "16", "--seeds", "0,1", "--data", str(ROOT / "examples"), *more,
                      "--tuned", str(tune_out / "results.json"), "--out", str(tmp_path / "conf"), "--work", str(tmp_path / "w2")])
    assert len(conf["runs"]) == 8 and set(conf["setup"]["lrs"]) == {"dense", "mst", "dense_avg", "mst_lrd1"}
    assert {m: lr for m, lr in conf["setup"]["lrs"].items() if m != "mst_lrd1"} == lrs
    md = (tmp_path / "conf" / "results.md").read_text()
    assert "MST, LR x 1/density against each method" in md and "Commands: " in md


def test_the_grid_widens_an_octave_past_each_edge_best():
    """Independent of training: a method whose best is the largest (smallest) LR it tried gets twice (half) that LR;
    a method with an interior best or on another schedule gets nothing; a diverged run never counts as a best."""
    fair = _load("fair")

    def run(m, sch, lr, loss):
        return {"method": m, "lr_schedule": sch, "lr": lr, "val_loss": loss}

    doc = {"runs": [run("dense", "wsd", 1e-3, 2.0), run("dense", "wsd", 8e-3, 1.5),      # best at the top edge
                    run("mst", "wsd", 1e-3, 1.4), run("mst", "wsd", 8e-3, 1.9),          # best at the bottom edge
                    run("rigl", "wsd", 1e-3, 2.0), run("rigl", "wsd", 4e-3, 1.2), run("rigl", "wsd", 8e-3, 1.9),
                    run("static", "wsd", 1e-3, 2.0), run("static", "wsd", 8e-3, float("inf")),
                    run("dense", "cosine", 1e-3, 2.5), run("dense", "cosine", 8e-3, 2.0)]}
    assert fair._edges(doc, ["wsd"], ["dense", "mst", "rigl", "static"]) == {("wsd", 1.6e-2): ["dense"],
                                                                              ("wsd", 5e-4): ["mst", "static"]}
    assert fair._edges(doc, ["wsd"], ["rigl"]) == {}


def test_confirm_without_tune_results_says_what_to_run(tmp_path):
    fair = _load("fair")
    with pytest.raises(SystemExit, match="run `fair.py tune` first"):
        fair.main(["confirm", "--tuned", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    assert fair._args(["confirm"]).tuned.endswith("tune500/results.json")  # the file tune writes by default


@pytest.mark.slow
def test_a_stopped_benchmark_picks_up_where_it_was(tmp_path, module_env, monkeypatch):
    """A run that fails is an error record (not the end of the benchmark); its folder is resumed by the
    next call and ends where the uninterrupted run ends; a finished folder is only evaluated again."""
    module_env.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    fair = _load("fair")
    import reproduce

    import mst_compile.train.loop as loop

    a = fair._args(["confirm", "--steps", "16", "--data", str(ROOT / "examples"), *TINY, "--work", str(tmp_path / "w")])
    a.base.seed, a.base.lr_schedule, a.base.lr_of = 0, "wsd", {}
    spec = reproduce._spec(a.base, "mst", a.base.d)
    whole = fair._safe_run({**spec, "out": str(tmp_path / "whole")})
    assert "error" not in whole and "resumed" not in whole

    train = loop.train
    monkeypatch.setattr(loop, "train", lambda *args, **kw: train(*args, **kw, stop_at=8))  # stopped at step 8 of 16
    part = {**spec, "out": str(tmp_path / "part")}
    stopped = fair._safe_run(part)
    assert stopped["error"].startswith("TrainingInterrupted") and stopped["val_loss"] != stopped["val_loss"]  # NaN
    monkeypatch.setattr(loop, "train", train)
    resumed = fair._safe_run(part)
    assert resumed["resumed"] and resumed["val_loss"] == whole["val_loss"]
    assert fair._safe_run(part)["val_loss"] == whole["val_loss"]  # the finished folder: evaluated, not trained again
    early = tmp_path / "early"  # stopped before its first checkpoint: trained afresh
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert fair._safe_run({**spec, "out": str(early)})["val_loss"] == whole["val_loss"]
    # the same folder asked for at another LR is refused before anything trains, naming what differs
    with pytest.raises(SystemExit, match=r"run folder .*part: trained with lr = 0\.00\d+, this run asks for 0\.5; pass another --work"):
        list(fair.run_pool([{**part, "lr": 0.5}], 1, fn=fair._safe_run))


def test_a_confirm_at_a_new_lr_trains_again_and_replaces_the_old_record(tmp_path, monkeypatch, capsys):
    """Independent of training: runs already in the file at the spec's LR are skipped; a run of the same name at
    another LR is trained and its record replaces the old one (a later tune moved the method's LR)."""
    fair = _load("fair")

    size = {"d": 32, "n_layer": 2, "steps": 40, "update_interval": None, "overrides": {}}
    today = {k: v for k, v in mst_compile.MSTConfig().to_dict().items()}
    old = [{"name": "mst/s0", "method": "mst", "lr": 4e-3, "lr_schedule": "wsd", "val_loss": 1.9, **size, "mst_config": today},
           {"name": "dense/s0", "method": "dense", "lr": 2e-3, "lr_schedule": "wsd", "val_loss": 1.5, **size}]
    specs = [{"name": "mst/s0", "method": "mst", "lr": 8e-3, "lr_schedule": "wsd", **size},
             {"name": "dense/s0", "method": "dense", "lr": 2e-3, "lr_schedule": "wsd", **size}]
    trained = []

    def fake_pool(todo, jobs, fn):
        trained.extend(s["name"] for s in todo)
        yield from ((s, {**s, "val_loss": 1.8}) for s in todo)

    monkeypatch.setattr(fair, "run_pool", fake_pool)
    monkeypatch.setattr(fair, "_save", lambda doc, out, render: None)
    doc = fair._pool(SimpleNamespace(out=tmp_path, jobs=1), specs, {"runs": [dict(r) for r in old]}, None)
    assert trained == ["mst/s0"]
    assert sorted((r["name"], r["lr"], r["val_loss"]) for r in doc["runs"]) == [("dense/s0", 2e-3, 1.5), ("mst/s0", 8e-3, 1.8)]
    assert doc["superseded"] == [old[0]]  # the replaced record is kept beside the table, not lost
    assert "mst/s0 at wsd 0.008 replaces the run at wsd 0.004 (val 1.9000)" in capsys.readouterr().out
    # at the same LR, a record of another recipe (the first defaults, from before the defaults changed; its record
    # predates attention_depth) or of another model size is trained again, never reported as today's run
    first = {k: v for k, v in today.items() if k != "attention_depth"} | {"warmup_end": 0.1, "lr_density_power": 0.0}
    stale = [{**old[0], "lr": 8e-3, "mst_config": first}, {**old[1], "d": 24}]
    trained.clear()
    fair._pool(SimpleNamespace(out=tmp_path, jobs=1), specs, {"runs": stale}, None)
    assert trained == ["mst/s0", "dense/s0"]
    trained.clear()
    fair._pool(SimpleNamespace(out=tmp_path, jobs=1), specs, {"runs": [{**old[0], "lr": 8e-3}, old[1]]}, None)
    assert trained == []  # the same recipe and size: kept
    from _fair_tables import _tuned_from  # the table names where each method's LR came from

    assert _tuned_from({"dense": "t500.json", "static_eq": "t500.json", "mst": "t3000.json"}) == \
        "`t500.json` (MST (defaults) from `t3000.json`)"
    assert _tuned_from("t500.json") == _tuned_from({"dense": "t500.json"}) == "`t500.json`"


def test_a_run_folder_of_another_recipe_is_never_picked_up(tmp_path):
    """A folder a benchmark finds (a rerun into the same --work) trained with the first defaults is refused in one
    line naming what differs when today's defaults are asked for; a folder of the same recipe is picked up."""
    _load("fair")
    from _pool import same_recipe

    from mst_compile.run_config import TrainConfig, dumps_config

    first = mst_compile.MSTConfig(warmup_end=0.1, lr_density_power=0.0, attention_depth=1.0)
    (tmp_path / "config.toml").write_text('model = "m.py"\n' + dumps_config(TrainConfig(steps=40), first))
    with pytest.raises(SystemExit, match=r"trained with another MST recipe \(warmup_end = 0\.1 \(now 0\.0\), "
                                         r"lr_density_power = 0\.0 \(now 0\.5\), attention_depth = 1\.0 \(now 0\.5\)\)"):
        same_recipe(tmp_path, mst_compile.MSTConfig())
    same_recipe(tmp_path, first)
