"""Schedules as pure functions (docs/design.md §3-4): no model involved."""
import math
import warnings

import pytest

from mst_compile import Ablation, MSTConfig
from mst_compile.runtime.schedule import (
    Schedule,
    drop_fraction,
    is_update_step,
    last_update_at,
    phase_at,
    phase_bounds,
    target_sparsity,
    update_steps,
    widening,
)


def run(total_steps, **kw):
    """The schedule of ``MSTConfig(**kw)`` over ``total_steps`` steps."""
    return Schedule(MSTConfig(**kw), total_steps)


def lr_multiplier(step, sched, *args, **kw):
    from mst_compile.runtime.schedule import lr_multiplier

    return lr_multiplier(step, sched.config, sched.total_steps, *args, **kw)


CFG = run(1000, sparsity=0.9, final_sparsity=0.5, warmup_end=0.1, ultra_end=0.8, update_interval=10)


def test_phase_bounds_and_names():
    assert phase_bounds(CFG) == (100, 800, 1000)
    assert [phase_at(t, CFG) for t in (0, 99, 100, 799, 800, 1000, 5000)] == [
        "warmup", "warmup", "ultra", "ultra", "restoration", "restoration", "restoration"]
    no_warmup = Schedule(CFG.config.replace(warmup_end=0.0), 1000)
    assert phase_at(0, no_warmup) == "ultra"


def test_three_phase_sparsity_closed_form():
    s_max, s_end = 0.9, 0.5
    for t in range(0, 100):
        u = t / 100
        assert target_sparsity(t, CFG) == pytest.approx(s_max * (1 - (1 - u) ** 3), abs=1e-12)
    for t in range(100, 800, 37):
        assert target_sparsity(t, CFG) == s_max
    for t in range(800, 1001, 13):  # the ramp ends at the last update (990), which lands s_end
        u = min(1.0, (t - 800) / 190)
        assert target_sparsity(t, CFG) == pytest.approx(s_end + (s_max - s_end) * (1 - u**3), abs=1e-12)
    # endpoints: dense start, continuous into ultra, final sparsity reached at the last update and held
    assert target_sparsity(0, CFG) == 0.0
    assert target_sparsity(99, CFG) < target_sparsity(100, CFG) == s_max
    assert update_steps(CFG)[-1] == 990 and target_sparsity(990, CFG) == pytest.approx(s_end)
    assert target_sparsity(989, CFG) > s_end
    assert target_sparsity(1000, CFG) == pytest.approx(s_end)
    assert target_sparsity(4000, CFG) == target_sparsity(1000, CFG)
    # cubic shape: the warm-up ramps fastest at its start, the restoration recovers fastest at its end
    ramp = [target_sparsity(t, CFG) for t in range(0, 101, 10)]
    steps = [b - a for a, b in zip(ramp, ramp[1:])]
    assert all(x > y for x, y in zip(steps, steps[1:]))
    back = [target_sparsity(t, CFG) for t in range(800, 991, 10)]
    falls = [a - b for a, b in zip(back, back[1:])]
    assert all(x < y for x, y in zip(falls, falls[1:]))


def test_drop_fraction_restarts_a_cosine_per_phase():
    cfg = Schedule(CFG.config.replace(drop_fraction=(0.5, 0.3, 0.1)), 1000)
    for (start, end), zeta in zip(((0, 100), (100, 800), (800, 1000)), (0.5, 0.3, 0.1)):
        assert drop_fraction(start, cfg) == pytest.approx(zeta)
        assert drop_fraction((start + end) // 2, cfg) == pytest.approx(zeta / 2)
        for t in range(start, end, 7):
            expected = zeta / 2 * (1 + math.cos(math.pi * (t - start) / (end - start)))
            assert drop_fraction(t, cfg) == pytest.approx(expected, abs=1e-12)
    assert drop_fraction(1000, cfg) == pytest.approx(0.0, abs=1e-12)
    assert drop_fraction(99, cfg) < 0.01 and drop_fraction(100, cfg) == pytest.approx(0.3)
    # drop_fraction sets warm-up and ultra by default; restoration drops nothing
    assert [drop_fraction(t, CFG) for t in (0, 100, 800)] == pytest.approx([0.3, 0.3, 0.0])


def test_piecewise_user_schedule():
    cfg = Schedule(CFG.config.replace(schedule=[(0, 0.2), (100, 0.8), (500, 0.8), (900, 0.4)]), 1000)
    assert target_sparsity(0, cfg) == 0.2
    assert target_sparsity(50, cfg) == pytest.approx(0.5)
    assert target_sparsity(300, cfg) == pytest.approx(0.8)
    assert target_sparsity(700, cfg) == pytest.approx(0.6)
    assert target_sparsity(950, cfg) == pytest.approx(0.4)  # held after the last point
    late = Schedule(CFG.config.replace(schedule=[(10, 0.5), (20, 0.7)]), 1000)
    assert target_sparsity(0, late) == 0.5  # held before the first point
    # phases and drop fractions still follow warmup_end / ultra_end
    assert phase_at(300, cfg) == "ultra" and drop_fraction(100, cfg) == pytest.approx(0.3)


def test_update_steps():
    cfg = run(35, update_interval=10, warmup_end=0.0)  # no warm-up: the updates alone are tested
    assert update_steps(cfg) == [10, 20, 30]
    assert [t for t in range(0, 50) if is_update_step(t, cfg)] == [10, 20, 30]
    assert [last_update_at(t, cfg) for t in (0, 9, 10, 29, 30, 35, 99)] == [0, 0, 10, 20, 30, 30, 30]


def test_no_update_at_or_after_the_last_optimizer_step():
    """Weights grown after step T would never train: the last update is the last multiple of ΔT below T."""
    cfg = run(30, update_interval=10, warmup_end=0.0, ultra_end=0.5)
    assert update_steps(cfg) == [10, 20] and not is_update_step(30, cfg)
    assert [last_update_at(t, cfg) for t in (19, 20, 29, 30, 40)] == [10, 20, 20, 20, 20]
    every = run(4, update_interval=1)
    assert update_steps(every) == [1, 2, 3]


def test_bad_input():
    with pytest.raises(ValueError, match="total_steps=0"):
        run(0)
    with pytest.raises(TypeError, match=r"MSTConfig\(total_steps=...\) is no longer accepted: .*sparsify"):
        MSTConfig(total_steps=100)
    with pytest.raises(ValueError, match="ultra_end"):
        MSTConfig(warmup_end=0.5, ultra_end=0.3)
    with pytest.raises(ValueError, match="step=-1"):
        target_sparsity(-1, CFG)
    with pytest.raises(ValueError, match="past total_steps=100"):
        run(100, schedule=[(0, 0.5), (200, 0.9)])
    with pytest.raises(ValueError, match="warmup phase .* contains no topology update"):
        run(50, update_interval=100, warmup_end=0.1)
    with pytest.raises(ValueError, match="ultra phase .* contains no topology update"):
        run(50, update_interval=50, warmup_end=0.0)  # one at step 50 would come after the last step
    with pytest.raises(ValueError, match="restoration phase .* the density would never be restored"):
        run(100, update_interval=10, warmup_end=0.2, ultra_end=0.95)
    with pytest.raises(ValueError, match=r"warmup phase \[0, 100\) .* expected update_interval <= 20"):
        run(1000, update_interval=100, warmup_end=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(1000, update_interval=50, warmup_end=0.1)
        run(1000)  # the derived interval always fits
        run(1000, warmup_end=0.1)


def test_derived_update_interval_gives_the_warmup_five_updates():
    for T in (60, 100, 1000, 3000, 100_000):
        cfg = run(T, warmup_end=0.1)
        assert sum(1 for k in update_steps(cfg) if phase_at(k, cfg) == "warmup") >= 5, T
    assert run(3000, warmup_end=0.1).interval == 59
    assert run(100_000, warmup_end=0.1).interval == 100  # capped: more updates buy nothing but probes
    assert run(3000, update_interval=7).interval == 7
    # without a warm-up (the defaults): 30 updates a run, the published 100 at 3000 steps, capped at 100
    assert (run(3000).interval, run(600).interval, run(100_000).interval, run(20).interval) == (100, 20, 100, 1)


def test_wsd_lr_is_flat_until_restoration_then_decays_to_the_floor():
    cfg = run(1000)  # restoration [800, 1000]
    assert [lr_multiplier(t, cfg) for t in (0, 400, 799, 800)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_multiplier(900, cfg) == pytest.approx(0.55)
    assert lr_multiplier(1000, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg, schedule="cosine") == pytest.approx(0.55)
    assert lr_multiplier(1000, cfg, min_ratio=0.0, schedule="cosine") == pytest.approx(0.0)
    # an explicit tail replaces the restoration phase: decay over the last 40% of the run
    assert lr_multiplier(599, cfg, decay=0.4) == 1.0 and lr_multiplier(800, cfg, decay=0.4) == pytest.approx(0.55)


def test_wsd_without_restoration_still_decays_over_the_stated_default_tail():
    one_phase = run(1000, warmup_end=0.0, ultra_end=1.0)  # no restoration: [t2, T] is empty
    assert lr_multiplier(799, one_phase) == 1.0
    assert lr_multiplier(900, one_phase) == pytest.approx(0.55)  # DEFAULT_LR_DECAY = 0.2
    assert lr_multiplier(1000, one_phase) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr schedule 'linear' is invalid"):
        lr_multiplier(0, one_phase, schedule="linear")


def test_attention_widens_through_restoration_then_turns_dense():
    cfg = run(1000, ablation=Ablation(attention_restore="widen"))  # restoration [800, 1000]
    seen = [widening(t, cfg) for t in (0, 100, 799, 800, 850, 900, 949, 950, 999)]
    assert seen == [None, None, None, 1.0, 2.0, 4.0, 4.0, None, None]
    assert all(widening(t, run(1000)) is None for t in range(0, 1001, 50))
