"""benchmarks/regime.py: the fit recovers a known law, and --quick trains every run of every point."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _regime():
    sys.path[:0] = [str(ROOT / "benchmarks")]
    spec = importlib.util.spec_from_file_location("regime", ROOT / "benchmarks" / "regime.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["regime"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_power_law_fit_recovers_the_law_and_its_crossings():
    rg = _regime()
    xs = [15.0, 60.0, 250.0, 1000.0, 2000.0]
    fit = rg.fit_power_law(xs, [30.0 * x ** -0.4 for x in xs])
    assert fit["a"] == pytest.approx(30.0) and fit["b"] == pytest.approx(0.4) and fit["points"] == 5
    assert rg.crossing(fit, 5.0) == pytest.approx((30.0 / 5.0) ** (1 / 0.4))
    rising = rg.fit_power_law(xs, [1.0 * x ** 0.2 for x in xs])
    assert rising["b"] == pytest.approx(-0.2) and rg.crossing(rising, 5.0) is None  # a gap that grows never crosses
    assert rg.fit_power_law(xs, [-1.0, -2.0, 3.0, -1.0, -0.5]) is None  # one positive gap: no fit
    flat = {"a": 20.0, "b": 1e-4, "points": 5}  # falls, but would cross 5% only at 10^6000 (a float overflows)
    assert rg.crossing(flat, 5.0) is None and rg.crossing({"a": 20.0, "b": 0.1}, 5.0) == pytest.approx(4.0 ** 10)
    from _regime_summary import _where

    assert "falls too slowly" in _where(None, 16.0, 2000.0, flat) and "grows" in _where(None, 16.0, 2000.0, rising)


def test_widths_pick_points_and_refuse_unknown_ones(capsys):
    rg = _regime()
    assert [pt[0] for pt in rg._args(["--widths", "64,16"]).points] == [64, 16]
    for bad in (["--widths", "65"], ["--widths", "x"], ["--widths", "64", "--package"]):
        with pytest.raises(SystemExit):
            rg._args(bad)
    assert "--widths 65: expected some of 16,24,32,48,64" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_tunes_every_method_and_pairs_the_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))  # the workers inherit it
    rg = _regime()
    doc = rg.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "runs"), "--jobs", "2"])
    points, lrs, seeds = doc["setup"]["points"], doc["setup"]["lrs"], doc["setup"]["seeds"]
    assert len(points) == 2 and lrs == [2e-3, 4e-3] and seeds == [0, 1]
    runs = {(r["point"], r["method"], r["lr"], r["seed"]): r for r in doc["runs"]}
    assert len(runs) == len(doc["runs"])  # no run twice
    # the screen: every method of every point at every LR of the grid, first seed, and an octave beyond it
    # while its best is the largest (smallest) LR it tried (fair.py's rule)
    screen = {k for k in runs if k[3] == 0}
    assert screen >= {(p["name"], m, lr, 0) for p in points for m in rg.METHODS for lr in lrs}
    s = doc["summary"]
    for p in points:
        tried = {m: sorted(k[2] for k in screen if k[:2] == (p["name"], m)) for m in rg.METHODS}
        best = {m: min(tried[m], key=lambda lr: runs[(p["name"], m, lr, 0)]["val_loss"]) for m in rg.METHODS}
        for m in rg.METHODS:
            assert all(b == pytest.approx(2 * a) for a, b in zip(tried[m], tried[m][1:]))  # octaves, no gap
            assert tried[m][0] < best[m] < tried[m][-1]  # every best inside what its method tried
        # the second seed: each method once, at its own best LR of the screen (the sized ones too)
        assert {k for k in runs if k[0] == p["name"] and k[3] == 1} == {(p["name"], m, best[m], 1) for m in rg.METHODS}
        at = {(m, seed): runs[(p["name"], m, best[m], seed)] for m in rg.METHODS for seed in seeds}
        for seed in seeds:
            dense, mst, eq = at[("dense", seed)], at[("mst", seed)], at[("dense_eq", seed)]
            assert mst["mst_flops"] < dense["mst_flops"] and dense["mst_flops"] == pytest.approx(dense["dense_flops"])
            assert eq["steps"] == rg.reproduce._equal_flops_steps(mst) < dense["steps"]  # sized by MST's ledger total
            avg = at[("dense_avg", seed)]  # the dense model of MST's average active parameter count
            assert avg["steps"] == dense["steps"] and avg["params"] < dense["params"]
            assert avg["params"] == pytest.approx(mst["avg_active_params"], rel=0.25)  # the nearest width of a tiny model
        assert p["tokens_per_param"] == pytest.approx(p["steps"] * 16 * 8 / p["params"])
        row = next(r for r in s["points"] if r["name"] == p["name"])
        for m in ("mst", "paper", "dense_eq", "dense_avg"):  # the gap: each seed against dense's run of that seed
            gaps = [100 * (at[(m, x)]["val_loss"] - at[("dense", x)]["val_loss"]) / at[("dense", x)]["val_loss"] for x in seeds]
            assert row["runs"][m]["lr"] == best[m] and row["runs"][m]["gaps_pct"] == pytest.approx(gaps)
            assert row["runs"][m]["gap_pct"] == pytest.approx(sum(gaps) / len(gaps))
        vs = [at[("mst", x)]["val_loss"] / at[("dense_avg", x)]["val_loss"] - 1 for x in seeds]
        assert row["mst_vs_dense_avg"]["gaps_pct"] == pytest.approx([100 * v for v in vs])
        from mst_compile.train.metrics import read_jsonl

        curves = {m: [x["lr"] * x["density"] ** (0.5 if m == "mst" else 0.0)  # the defaults' factor (1/density)^0.5 off
                      for x in read_jsonl(Path(runs[(p["name"], m, lrs[0], 0)]["out"]) / "metrics.jsonl")
                      if x["kind"] == "train"] for m in ("dense", "mst", "paper", "dense_avg")}
        assert curves["mst"] == pytest.approx(curves["dense"], rel=1e-12)
        assert curves["dense"] == curves["paper"] == curves["dense_avg"]  # one learning-rate curve for all
        vs_pkg = next(v for v in rg.package_map(doc)["configs"]["default"]["vs_dense_avg"]  # what mstc plan reads
                      if v["tokens_per_param"] == p["tokens_per_param"])
        assert vs_pkg["gaps_pct"] == pytest.approx([100 * v for v in vs]) and vs_pkg["dense_avg_params"] == at[("dense_avg", 0)]["params"]
        assert vs_pkg["verdict"] == ("above" if min(vs) > 0 else "below" if max(vs) < 0 else "mixed")
    assert s["measured_range"] == [min(p["tokens_per_param"] for p in points), max(p["tokens_per_param"] for p in points)]
    for m in ("mst", "paper"):
        assert len(s["series"][m]["points"]) == 2
    out = tmp_path / "out"
    assert (out / "regime.png").stat().st_size > 0
    assert json.loads((out / "regime.json").read_text())["summary"] == json.loads(json.dumps(s))
    md = (out / "regime.md").read_text()
    assert "tokens/param" in md and "MST defaults" in md and "paper preset" in md and "seeds 0, 1" in md
    # --reuse dense,paper (after a change of the defaults): exactly those runs come back from the last map, and only
    # from a map of the same setup whose paper runs trained today's preset
    args = ["--quick", "--out", str(out), "--work", str(tmp_path / "runs2")]
    reused = rg.reused_runs(rg._args([*args, "--reuse", "dense,paper"]), points)
    assert sorted(r["name"] for r in reused) == sorted(r["name"] for r in doc["runs"] if r["method"] in ("dense", "paper"))
    assert rg.reused_runs(rg._args(args), points) == []
    with pytest.raises(SystemExit, match="ran another setup \\(lrs differ\\)"):
        rg.reused_runs(rg._args([*args, "--reuse", "dense", "--lrs", "1e-3,2e-3"]), points)
    stale = json.loads((out / "regime.json").read_text())
    for r in stale["runs"]:
        if r["method"] == "paper":
            r["mst_config"]["sparsity"] = 0.8
    (out / "regime.json").write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="trained another recipe than today's paper preset"):
        rg.reused_runs(rg._args([*args, "--reuse", "paper"]), points)
    with pytest.raises(SystemExit):
        rg._args([*args, "--reuse", "mst"])  # MST's own runs (and what is sized from them) always train again
