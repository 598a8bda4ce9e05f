"""benchmarks/reproduce.py --quick: every method trains, and the table's numbers obey the ledger's rules."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod  # spawned workers import it by this name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory, module_env):
    d = tmp_path_factory.mktemp("reproduce")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))  # the workers inherit it; tokenizes the corpus afresh
    doc = _reproduce().main(["--quick", "--out", str(d / "out"), "--work", str(d / "runs")])
    return d, doc


@pytest.mark.slow
def test_quick_run_trains_every_method(quick):
    d, doc = quick
    runs = {r["name"]: r for r in doc["runs"]}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _frontier import dense_per_token
    from _methods import ORDER

    expected = set(ORDER) | {"dense@d64", "mst@d64"}
    assert set(runs) == expected
    for r in runs.values():
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(256) + 1, r["name"]
        assert r["curve"] and r["curve"][-1]["step"] == r["steps"], r["name"]
        # the curve's FLOPs grow along the run and end at the run's ledger total
        flops = [p["flops"] for p in r["curve"]]
        assert flops == sorted(flops) and flops[-1] == pytest.approx(r["mst_flops"]), r["name"]
    # same model and tokens: every full-length run has the same dense-equivalent FLOPs
    dense = runs["dense"]
    for name in expected - {"dense_eq", "dense_narrow", "dense_shallow", "dense_avg", "dense@d64", "mst@d64"}:
        assert runs[name]["dense_flops"] == pytest.approx(dense["dense_flops"]), name
    assert dense["mst_flops"] == pytest.approx(dense["dense_flops"])
    # one learning-rate curve: every run of the same length has the same lr, step by step, dense or sparse
    from mst_compile.train.metrics import read_jsonl

    # (the defaults' lr_density_power multiplies the curve by (1/density)^p, the density logged beside it)
    power = {n: (r.get("mst_config") or {}).get("lr_density_power", 0.0) for n, r in runs.items()}
    lrs = {n: [x["lr"] * x["density"] ** power[n] for x in read_jsonl(Path(r["out"]) / "metrics.jsonl") if x["kind"] == "train"]
           for n, r in runs.items()}
    assert power["mst"] == 0.5 and power["mst_no_sv"] == power["static"] == 0.0
    for name, r in runs.items():
        if r["steps"] == dense["steps"]:
            assert lrs[name] == pytest.approx(lrs["dense"], rel=1e-12), name
    assert lrs["dense"][-1] < lrs["dense"][len(lrs["dense"]) // 2]  # and it decays
    # sparse methods spend fewer FLOPs; the three constant-90% baselines spend the same
    for name in ("static", "set", "rigl", "mst", "mst_v0", "paper", "mst_no_sv", "mst_no_hsa", "mst_grad_grow", "static_eq"):
        assert runs[name]["mst_flops"] < 0.6 * dense["mst_flops"], name
    # SET grows at random, so it never forms the dense gradient that RigL pays for before each update
    assert runs["set"]["mst_flops"] == pytest.approx(runs["static"]["mst_flops"])
    assert runs["set"]["mst_flops"] < runs["rigl"]["mst_flops"]
    # HSA only removes attention work; gradient-only growth changes which weights grow, not how many (both ablate
    # the first defaults, mst_v0)
    assert runs["mst_no_hsa"]["mst_flops"] > runs["mst_v0"]["mst_flops"]
    assert runs["mst_grad_grow"]["mst_flops"] == pytest.approx(runs["mst_v0"]["mst_flops"])
    # dense at equal FLOPs: MST's budget to within one dense step
    eq = runs["dense_eq"]
    assert eq["steps"] < dense["steps"]
    assert abs(eq["mst_flops"] - runs["mst"]["mst_flops"]) <= 0.5 * dense["dense_flops_per_step"] + 1
    # the compute-fair baselines: static at MST's FLOPs within 5%; smaller dense models trained for all the
    # steps, each the width whose cost by the ledger (_frontier, at batch 1) is nearest MST's budget, as the run was charged
    mst = runs["mst"]
    assert doc["setup"]["predicted_mst_flops"] == pytest.approx(mst["mst_flops"], rel=1e-9)  # batch-1 sizing run
    assert runs["static_eq"]["mst_flops"] == pytest.approx(mst["mst_flops"], rel=0.05)
    tokens = dense["steps"] * 4 * 32  # quick: batch 4, T 32
    budget = mst["mst_flops"] / tokens
    for name, depth in (("dense_narrow", 2), ("dense_shallow", 1)):
        r = runs[name]
        assert r["steps"] == dense["steps"] and r["n_layer"] == depth and r["d"] < 32, name
        assert r["mst_flops"] == pytest.approx(tokens * dense_per_token(depth, r["d"], 32), rel=1e-6), name
        for w in (r["d"] - 2, r["d"] + 2):  # no other width (a multiple of the 2 heads) is nearer the budget
            assert abs(dense_per_token(depth, w, 32) - budget) >= abs(r["mst_flops"] / tokens - budget), (name, w)
    assert dense["dense_flops"] == pytest.approx(tokens * dense_per_token(2, 32, 32), rel=1e-6)
    # the dense model of MST's average size: parameters within 5% of MST's average active parameters, where
    # that average is the per-step density (logged every step of the sizing run) over the sparse weights
    avg = runs["dense_avg"]
    assert avg["steps"] == dense["steps"] and avg["n_layer"] == 2 and avg["d"] < 32
    assert mst["sparse_params"] < dense["params"] and avg["params"] == pytest.approx(mst["avg_active_params"], rel=0.05)
    assert dense["params"] - mst["sparse_params"] < mst["avg_active_params"] < dense["params"]
    # the wider model has more parameters and more FLOPs per step
    assert runs["dense@d64"]["params"] > 3 * dense["params"]
    assert runs["dense@d64"]["dense_flops"] > 3 * dense["dense_flops"]


@pytest.mark.slow
def test_quick_run_writes_table_json_and_plots(quick):
    import matplotlib.image as mpimg

    d, doc = quick
    out = d / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["bar"] == doc["bar"] and len(saved["runs"]) == len(doc["runs"])
    bar = doc["bar"]
    mst = next(r for r in doc["runs"] if r["name"] == "mst")
    dense = next(r for r in doc["runs"] if r["name"] == "dense")
    assert bar["reduction"] == pytest.approx(dense["mst_flops"] / mst["mst_flops"])
    assert bar["gap_pct"] == pytest.approx(100 * (mst["val_loss"] / dense["val_loss"] - 1))
    assert bar["met"] == (bar["reduction"] >= 4 and bar["beats_static"] and bar["beats_equal_flops"])
    static = next(r for r in doc["runs"] if r["name"] == "static")
    assert bar["vs_static_pct"] == pytest.approx(100 * (mst["val_loss"] / static["val_loss"] - 1))
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| method", "| width")) and "---" not in line]
    assert len(rows) == 15 + 2  # fifteen methods, then the two widths
    assert "| dense (baseline) | 40 |" in md and "| 1.00x |" in md and "--quick" in md
    for name in ("loss_vs_flops", "gap_vs_params"):
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] > 300 and img.shape[1] > 400 and img[..., :3].std() > 0.05, name
    assert (d / "runs" / "report" / "report.md").is_file()


@pytest.mark.slow
def test_merge_joins_split_runs_into_the_same_table(quick, tmp_path):
    d, doc = quick
    rep = sys.modules["reproduce"]
    first = {**doc, "runs": [r for r in doc["runs"] if r["method"] in ("dense", "mst", "dense_eq")]}
    second = {**doc, "runs": [r for r in doc["runs"] if r["method"] not in ("dense", "mst", "dense_eq")]}
    for name, part in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = rep.merge(tmp_path / "m", [tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"], "merge")
    assert merged["bar"] == doc["bar"]  # the verdict needs only dense, mst and dense_eq
    assert sorted(r["name"] for r in merged["runs"]) == sorted(r["name"] for r in doc["runs"])
    assert (tmp_path / "m" / "results.md").read_text().count("\n| ") == (d / "out" / "results.md").read_text().count("\n| ")
    # a rerun replaces the earlier run of the same name: the last part that has it wins
    rerun = {**first, "runs": [{**r, "val_loss": r["val_loss"] + 1.0} if r["method"] == "dense_eq" else r for r in first["runs"]]}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(rerun))
    replaced = rep.merge(tmp_path / "m2", [tmp_path / "a" / "results.json", tmp_path / "b" / "results.json",
                                           tmp_path / "c" / "results.json"], "merge")
    assert len(replaced["runs"]) == len(merged["runs"])
    eq = {r["name"]: r for r in merged["runs"]}["dense_eq"]
    assert {r["name"]: r for r in replaced["runs"]}["dense_eq"]["val_loss"] == pytest.approx(eq["val_loss"] + 1.0)


def test_every_table_is_one_valid_command():
    rep = _reproduce()
    assert set(rep.TABLES) == {"steps500", "steps3000", "heldout3000"}
    for name, (folder, parts) in rep.TABLES.items():
        assert (ROOT / folder).is_dir(), name  # the folder benchmarks/README.md quotes
        for part in parts:
            rep._args(part)  # parses: known methods, valid overrides
    with pytest.raises(SystemExit, match="expected one of steps500, steps3000, heldout3000"):
        rep.main(["--table", "heldout"])


def test_width_search_finds_the_brute_force_answer():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _frontier

    for size in (lambda w: 3 * w * w + 7 * w, lambda w: w ** 3):
        for target in (1, 5, 10, 100, 1234.5, 1e5, 2e7, 1e12):
            for step in (1, 2, 3, 4):
                brute = min(range(step, _frontier.WIDEST, step), key=lambda w: abs(size(w) - target))
                assert _frontier._nearest_multiple(size, target, step) == brute, (target, step)


@pytest.mark.slow
def test_table_runs_every_part_and_merges_them(quick, tmp_path, monkeypatch):
    _, doc = quick
    rep = sys.modules["reproduce"]
    calls = []

    def fake_run(a, command):  # writes the quick run's records of a's methods where a run writes its table
        calls.append((Path(a.out), command))
        part = {**doc, "command": command, "runs": [r for r in doc["runs"] if r["method"] in a.methods]}
        Path(a.out).mkdir(parents=True)
        (Path(a.out) / "results.json").write_text(json.dumps(part))
        return part

    monkeypatch.setattr(rep, "ROOT", tmp_path)
    monkeypatch.setattr(rep, "run", fake_run)
    monkeypatch.setattr(rep, "TABLES", {"two": ("out", [["--quick", "--methods", "dense,mst,dense_eq"], ["--quick", "--methods", "static"]]),
                                        "one": ("single", [["--quick", "--methods", "dense"]])})
    merged = rep.main(["--table", "two"])
    cmd = "PYTHONPATH=. python benchmarks/reproduce.py "
    assert calls == [(tmp_path / "out" / "part-a", cmd + "--quick --methods dense,mst,dense_eq --out out/part-a --work runs/two/part-a"),
                     (tmp_path / "out" / "part-b", cmd + "--quick --methods static --out out/part-b --work runs/two/part-b")]
    assert merged["command"] == [cmd + "--table two"]  # the one command that made the table
    assert {r["method"] for r in merged["runs"]} == {"dense", "mst", "dense_eq", "static"}
    assert merged["bar"]["vs_static_pct"] == pytest.approx(doc["bar"]["vs_static_pct"])
    assert f"Command: `{cmd}--table two`" in (tmp_path / "out" / "results.md").read_text()
    calls.clear()
    rep.main(["--table", "one"])  # a table of one part is that run, written to the folder itself
    assert calls == [(tmp_path / "single", cmd + "--table one")]
