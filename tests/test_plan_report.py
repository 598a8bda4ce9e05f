"""plan_report.py: TrainingPlan's derived figures, its --json and the text mstc plan prints, on a plan
written by hand (estimated hardware and timed here)."""
import json

from mst_compile.plan_report import TrainingPlan, _duration


def _plan(**kw):
    base = dict(model="m.py", params=1000, tokens=50_000, steps=100, tokens_per_step=500, block_size=50,
                dense_flops=6e9, mst_flops=2e9, phases=[{"phase": "warmup", "steps": 10, "mst_flops": 5e8, "dense_flops": 6e8},
                                                        {"phase": "ultra", "steps": 90, "mst_flops": 1.5e9, "dense_flops": 5.4e9}],
                hardware={"name": "a100", "utilization": 0.4, "kernels": "tile"}, dense_hours=3.0, mst_hours=1.5,
                expected_gap=2.5, extrapolated=False, regime={"measured_range": [10, 1000], "series": "default", "note": "n"},
                avg_active_params=400.0)
    return TrainingPlan(**{**base, **kw})


def test_derived_figures_and_json():
    p = _plan()
    assert p.tokens_per_param == 50.0 and p.reduction == 3.0
    d = json.loads(json.dumps(p.as_dict()))
    assert d["tokens_per_param"] == 50.0 and d["reduction"] == 3.0 and d["phases"] == p.phases
    assert d["flops_are"].startswith("algorithmic")


def test_render_estimated():
    text = _plan().render()
    assert text.splitlines()[0] == "plan for m.py"
    assert "(100 steps x 500 tokens, T=50)" in text and "(3.00x fewer, algorithmic)" in text
    assert "ultra           1.500e+09 in 90 steps (3.60x)" in text
    assert "a100, 40% utilisation" in text and "(2.00x realised" in text
    assert "+2.5% final loss vs dense (regime map of default" in text and "EXTRAPOLATED" not in text
    assert "about 400 parameters" in text
    assert "EXTRAPOLATED" in _plan(extrapolated=True).render()
    assert "expected gap      unknown (no map here)" in _plan(expected_gap=None, regime={"note": "no map here"}).render()
    assert "fair benchmark that model ended below MST" in text  # no measured point: the README's comparison


def test_render_the_average_size_dense_model_from_the_map():
    vs = {"tokens_per_param": 16.0, "dense_avg_params": 28560, "dense_avg_reduction": 4.2, "gaps_pct": [4.0, 5.4, 3.6],
          "verdict": "above"}
    regime = {"measured_range": [10, 1000], "series": "default", "note": "n", "vs_dense_avg": vs}
    text = " ".join(_plan(regime=regime).render().split())  # the text is wrapped
    assert "Measured: at 16 tokens/param on the map, the dense model of MST's average size ended below MST at every seed" in text
    assert "(MST +4.0% / +5.4% / +3.6%; that model: 28,560 parameters, 4.2x fewer FLOPs than dense)" in text
    assert "Train it instead" in text and "fair benchmark" not in text
    mixed = " ".join(_plan(regime={**regime, "vs_dense_avg": {**vs, "verdict": "mixed"}}).render().split())
    assert "came out mixed across seeds" in mixed and "Train it instead" not in mixed


def test_render_timed_here():
    hw = {"measured": {"device": "cpu", "batch_size": 5, "step_s": {"dense": 0.2, "warmup": 0.15, "ultra": 0.1},
                       "repeats": {"dense": 5, "warmup": 3}, "updates": 12}}
    text = _plan(hardware=hw).render()
    assert "this machine (cpu): timed, not estimated" in text
    assert "dense 0.2 s; MST warmup 0.15 s, ultra 0.1 s (median of 3+" in text
    assert "timed at batch 5 of 10" in text and "the 12 topology updates not timed" in text
    assert "timed at batch" not in _plan(hardware={**hw, "measured": {**hw["measured"], "batch_size": 10}}).render()


def test_durations():
    assert _duration(0.5 / 3600) == "0.5 s" and _duration(0.25) == "15.0 min" and _duration(3.0) == "3.0 h"
    assert _duration(72.0) == "72.0 h (3.0 days)"
