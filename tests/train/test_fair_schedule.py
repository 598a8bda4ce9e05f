"""One learning-rate curve for every run, and the final sparsity a run is configured for is the one it ends at.

Fair comparisons need both: a dense baseline and an MST run of the same length must train on the same
learning rate, step by step (the trainer owns the schedule, not MST's phases), and a run configured
to restore to ``final_sparsity`` must end there, not at whatever its last topology update reached.
"""
import math

import pytest
from _train_models import TINY, write

import mst_compile
from mst_compile.train.loop import train
from mst_compile.train.metrics import read_jsonl
from mst_compile.train.options import TrainConfig

STEPS = 20


def _lrs(run) -> list[float]:
    return [r["lr"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_dense_mst_and_one_phase_baselines_share_the_learning_rate_step_by_step(tmp_path, schedule):
    write(tmp_path, "tiny.py", TINY)
    base = dict(steps=STEPS, batch_size=2, block_size=32, eval_iters=1, eval_interval=STEPS, log_interval=1, lr=2e-3,
                warmup_steps=2, lr_schedule=schedule)
    # the shared curve; lr_density_power (the defaults' 0.5) multiplies it by the method's own factor (tested below)
    mst = mst_compile.MSTConfig(update_interval=2, warmup_end=0.2, ultra_end=0.8, stride=4, lr_density_power=0.0)
    static = mst.replace(warmup_end=0.0, ultra_end=1.0, sparsity=0.9, drop_fraction=0.0, attention="dense")  # one phase
    runs = {"mst": (TrainConfig(**base), mst), "dense": (TrainConfig(**base, dense=True), mst),
            "dense, default MSTConfig": (TrainConfig(**base, dense=True), mst_compile.MSTConfig()),
            "static": (TrainConfig(**base), static)}
    lrs = {}
    for name, (tc, cfg) in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        train(tmp_path / "tiny.py", tc, cfg, out=out, progress=False)
        lrs[name] = _lrs(out)
    assert len(lrs["mst"]) == STEPS
    for name in runs:
        assert lrs[name] == lrs["mst"], name  # identical floats, not merely close
    # and the curve is the stated one: linear warm-up, then flat until the last 20% (WSD) or a cosine
    want = []
    for t in range(STEPS):
        if t < 2:
            want.append(2e-3 * (t + 1) / 3)
            continue
        start = 16 if schedule == "wsd" else 2
        u = max(0.0, (t - start) / (STEPS - start))
        want.append(2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * u)))
    assert lrs["mst"] == pytest.approx(want)


@pytest.mark.parametrize("interval", [3, 4])
def test_a_run_ends_at_its_configured_final_sparsity(tmp_path, interval):
    """0.9 -> 0.5 with updates every ``interval`` steps over 40: the last update (39 or 36) lands 0.5."""
    write(tmp_path, "tiny.py", TINY)
    steps = 40
    tc = TrainConfig(steps=steps, batch_size=2, block_size=32, eval_iters=1, eval_interval=steps, log_interval=1)
    cfg = mst_compile.MSTConfig(update_interval=interval, sparsity=0.9, final_sparsity=0.5,
                                warmup_end=0.25, ultra_end=0.75, stride=4)
    s = train(tmp_path / "tiny.py", tc, cfg, out=tmp_path / "run", progress=False)
    sparse = [n for n in s["final_densities"]]
    assert sparse and s["final_density"] == pytest.approx(0.5, abs=0.002)  # active / total over every sparse weight
    last = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert last["target_sparsity"] == pytest.approx(0.5)


def test_lr_density_power_raises_a_sparse_runs_learning_rate_by_its_density(tmp_path):
    """``lr_density_power=1``: every step's lr is the shared curve's divided by the density it trains at;
    a dense run with the same config keeps the curve."""
    write(tmp_path, "tiny.py", TINY)
    base = dict(steps=STEPS, batch_size=2, block_size=32, eval_iters=1, eval_interval=STEPS, log_interval=1, lr=2e-3,
                warmup_steps=2)
    mst = mst_compile.MSTConfig(update_interval=2, warmup_end=0.2, ultra_end=0.8, stride=4, lr_density_power=0.0)
    rows = {}
    for name, tc, cfg in [("curve", TrainConfig(**base), mst),
                          ("scaled", TrainConfig(**base), mst.replace(lr_density_power=1.0)),
                          ("dense", TrainConfig(**base, dense=True), mst.replace(lr_density_power=1.0))]:
        train(tmp_path / "tiny.py", tc, cfg, out=tmp_path / name, progress=False)
        rows[name] = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
    densities = [r["density"] for r in rows["scaled"]]
    assert densities[0] == 1.0 and min(densities) < 0.2  # dense start, then the ultra phase
    for curve, scaled in zip(rows["curve"], rows["scaled"]):
        assert scaled["lr"] == pytest.approx(curve["lr"] / scaled["density"], rel=1e-12)
    assert [r["lr"] for r in rows["dense"]] == [r["lr"] for r in rows["curve"]]


def test_lr_density_power_in_an_own_loop(tmp_path):
    torch = pytest.importorskip("torch")
    from _models import tiny_gpt

    model = tiny_gpt()
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.2, ultra_end=0.8, stride=4, lr_density_power=0.5)
    sm = mst_compile.sparsify(model, cfg, total_steps=STEPS, seed=0)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    plain = mst_compile.sparsify(tiny_gpt(), cfg.replace(lr_density_power=0.0), total_steps=STEPS, seed=0)
    plain.mst.attach(None)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(8):
        sm(x).float().mean().backward()
        opt.step()
        opt.zero_grad()  # the attached optimizer's step advanced MST
        plain.mst.step()
        masks = list(sm.mst.masks().values())
        density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)  # from the masks themselves
        assert sm.mst.lr_scale() == pytest.approx(density ** -0.5)
        assert sm.mst.lr_multiplier() == pytest.approx(plain.mst.lr_multiplier() * density ** -0.5)
    assert density < 1.0


def test_lr_density_scope_weight_scales_each_sparse_weight_by_its_own_density(tmp_path, monkeypatch):
    """``lr_density_scope="weight"``: at every step each sparse weight's param group trains at the run's lr times
    (numel / active entries of its own mask)^p, counted from the masks it trains with; every other parameter
    (and the logged lr) keeps the curve. A run stopped halfway resumes with the same groups and ends where the
    uninterrupted run ends."""
    from mst_compile.train import loop

    write(tmp_path, "tiny.py", TINY)
    tc = TrainConfig(steps=STEPS, batch_size=2, block_size=32, eval_iters=1, eval_interval=STEPS, log_interval=1, lr=2e-3,
                     warmup_steps=2)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=0.8, stride=4, lr_density_power=0.5,
                                lr_density_scope="weight")
    seen, step_once = [], loop._train_step

    def watched(run, step, lr, stop):
        masks = {n: m.clone() for n, m in run.acct.mst.masks().items()}  # what this step trains with
        out = step_once(run, step, lr, stop)
        seen.append((lr, masks, [(g.get("mst_weight"), g["lr"]) for g in run.opt.param_groups]))
        return out

    monkeypatch.setattr(loop, "_train_step", watched)
    whole = train(tmp_path / "tiny.py", tc, cfg, out=tmp_path / "whole", progress=False)
    assert len(seen) == STEPS
    spread = []
    for lr, masks, groups in seen:
        named = {n: glr for n, glr in groups if n is not None}
        assert set(named) == set(masks)  # one group per sparse weight
        for name, mask in masks.items():
            assert named[name] == pytest.approx(lr * (mask.numel() / float(mask.sum())) ** 0.5, rel=1e-9), name
        assert all(glr == lr for n, glr in groups if n is None)  # layer norms, biases, position embedding: the curve
        spread.append(max(named.values()) / min(named.values()))
    assert max(spread) > 1.2  # ER gives the weights different densities, so their lrs differ
    assert [r["lr"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "train"] == [s[0] for s in seen]

    monkeypatch.setattr(loop, "_train_step", step_once)
    with pytest.raises(loop.TrainingInterrupted):
        train(tmp_path / "tiny.py", tc, cfg, out=tmp_path / "split", progress=False, stop_at=STEPS // 2)
    resumed = train(tmp_path / "tiny.py", resume=tmp_path / "split", progress=False)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)


def test_lr_density_scope_weight_in_an_own_loop():
    torch = pytest.importorskip("torch")
    from _models import tiny_gpt

    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=0.8, stride=4, lr_density_power=0.5,
                                lr_density_scope="weight")
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=STEPS, seed=0)
    plain = mst_compile.sparsify(tiny_gpt(), cfg.replace(lr_density_power=0.0), total_steps=STEPS, seed=0)
    plain.mst.attach(None)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(4):
        sm(x).float().mean().backward()
        opt.step()
        opt.zero_grad()
        plain.mst.step()
        assert sm.mst.lr_scale() == 1.0  # no run-wide factor: the weights carry their own
        assert sm.mst.lr_multiplier() == pytest.approx(plain.mst.lr_multiplier())
        scales = sm.mst.lr_scales()
        for name, mask in sm.mst.masks().items():
            assert scales[name] == pytest.approx((mask.numel() / float(mask.sum())) ** 0.5)
    assert plain.mst.lr_scales() == {}
    with pytest.raises(ValueError, match="lr_density_scope"):
        mst_compile.MSTConfig(lr_density_scope="layer")
