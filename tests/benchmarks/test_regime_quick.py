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


@pytest.mark.slow
def test_quick_run_writes_the_map(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))  # the workers inherit it
    rg = _regime()
    doc = rg.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "runs"), "--jobs", "2"])
    points = doc["setup"]["points"]
    assert len(points) == 2
    runs = {(r["point"], r["method"]): r for r in doc["runs"]}
    assert set(runs) == {(p["name"], m) for p in points for m in rg.METHODS}
    for p in points:
        dense, mst, eq = (runs[(p["name"], m)] for m in ("dense", "mst", "dense_eq"))
        assert mst["mst_flops"] < dense["mst_flops"] and dense["mst_flops"] == pytest.approx(dense["dense_flops"])
        assert eq["steps"] == rg.reproduce._equal_flops_steps(mst) < dense["steps"]  # sized by MST's ledger total
        assert p["tokens_per_param"] == pytest.approx(p["steps"] * 16 * 8 / p["params"])
        avg = runs[(p["name"], "dense_avg")]  # the dense model of MST's average active parameter count
        assert avg["steps"] == dense["steps"] and avg["params"] < dense["params"]
        assert avg["params"] == pytest.approx(mst["avg_active_params"], rel=0.25)  # the nearest width of a tiny model
        from mst_compile.train.metrics import read_jsonl

        lrs = {m: [x["lr"] for x in read_jsonl(Path(runs[(p["name"], m)]["out"]) / "metrics.jsonl") if x["kind"] == "train"]
               for m in ("dense", "mst", "paper", "dense_avg")}
        assert lrs["mst"] == lrs["dense"] == lrs["paper"] == lrs["dense_avg"]  # one learning-rate curve for every method
    s = doc["summary"]
    assert s["measured_range"] == [min(p["tokens_per_param"] for p in points), max(p["tokens_per_param"] for p in points)]
    for m in ("mst", "paper"):
        assert len(s["series"][m]["points"]) == 2
    out = tmp_path / "out"
    assert (out / "regime.png").stat().st_size > 0
    assert json.loads((out / "regime.json").read_text())["summary"] == json.loads(json.dumps(s))
    md = (out / "regime.md").read_text()
    assert "tokens/param" in md and "MST defaults" in md and "paper preset" in md
