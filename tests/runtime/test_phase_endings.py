"""How MST's phases end: the phase-aware learning rate, widening attention, grown-weight init, presets."""
import math

import pytest
import torch
import torch.nn.functional as F
from _train_models import TINY, write
from torch import nn

import mst_compile
from mst_compile.ops.attention import HybridSparseAttention, mean_attended_keys
from mst_compile.train.metrics import read_jsonl


def _oracle_attention(q, k, v, l):
    """Dense-mask reference: causal keys with i - j < l or (i - j) % l == 0."""
    T = q.shape[-2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    keep = (j <= i) & (((i - j) < l) | ((i - j) % l == 0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("scale,T", [(1.0, 64), (2.0, 64), (4.0, 64), (2.0, 37)])
def test_widened_window_runs_the_widened_pattern(scale, T):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g, requires_grad=True) for _ in range(3))
    site = HybridSparseAttention("h.0.attn", pattern="sparse")  # stride None: T/8
    site.stride_scale = scale
    l = math.ceil((T // 8 or 1) * scale)
    out = site(q, k, v)
    ref = _oracle_attention(q, k, v, l)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gq, = torch.autograd.grad(out.sum(), q)
    rq, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, rq, atol=1e-5, rtol=1e-5)
    assert site.effective(T) == ("sparse", l)


def test_window_that_covers_every_key_is_dense_causal():
    site = HybridSparseAttention("a", pattern="sparse")
    site.stride_scale = 8.0  # 8 · T/8 = T
    assert site.effective(64) == ("dense", 64)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    torch.testing.assert_close(site(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_widen_through_a_training_run_and_the_ledger_charges_each_width():
    from _models import tiny_gpt

    T_run = 40
    cfg = mst_compile.MSTConfig(update_interval=2, ablation=mst_compile.Ablation(attention_restore="widen"),
                                attention_phases=("ultra",), attention_depth=1.0)  # restoration [32, 40] widens, every site
    model = tiny_gpt()
    sm = mst_compile.sparsify(model, cfg, total_steps=T_run)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for step in range(T_run):
        before = sm.mst.flops.attention_mst
        site = next(iter(sm.mst.attention_modules().values()))
        effective = site.effective(16)
        logits = sm(ids)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        seen[step] = (effective, sm.mst.flops.attention_mst - before)
    l0 = 2  # T/8 at T = 16
    expect = {31: ("sparse", l0), 32: ("sparse", l0), 34: ("sparse", 2 * l0), 36: ("sparse", 4 * l0), 38: ("dense", 16)}
    for step, eff in expect.items():
        assert seen[step][0] == eff, step
    # the ledger's attention charge per step follows the widened pattern: a(l) keys per query
    n_sites = len(sm.mst.attention_modules())
    per_key = 12.0 * 16 * (2 * 2) * 16 * n_sites  # 12·d_head·(B·heads)·T per attended key, every site
    for step, (pattern, l) in expect.items():
        a = mean_attended_keys(pattern, 16, l) if pattern != "dense" else 17 / 2
        assert seen[step][1] == pytest.approx(per_key * a), step


def _grown_weights(grow_init_scale: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    cfg = mst_compile.MSTConfig(update_interval=2, schedule=[(0, 0.8)], drop_fraction=0.5,
                                warmup_end=0.0, ultra_end=1.0, grow_gradient_fraction=0.0,
                                ablation=mst_compile.Ablation(grow_init_scale=grow_init_scale))
    sm = mst_compile.sparsify(model, cfg, total_steps=4)
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)  # lr 0: only MST changes the weights
    sm.mst.attach(opt)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        w_before = {n: p.detach().clone() for n, p in sm.mst.parameters().items()}
        m_before = {n: m.clone() for n, m in sm.mst.masks().items()}
        sm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return sm, w_before, m_before


def test_grown_weights_start_at_the_scaled_layer_rms():
    sm, w_before, m_before = _grown_weights(0.5)
    for n, p in sm.mst.parameters().items():
        new, old = sm.mst.masks()[n], m_before[n]
        grown, kept = new & ~old, new & old
        assert int(grown.sum()) > 300
        assert torch.all(p[~new] == 0)
        torch.testing.assert_close(p[kept], w_before[n][kept])  # lr 0: survivors untouched
        sigma = 0.5 * w_before[n][kept].pow(2).mean().sqrt()
        got = p[grown].detach()
        assert float(got.std()) == pytest.approx(float(sigma), rel=0.15), n  # 4 standard errors at n > 300
        assert abs(float(got.mean())) < 4 * float(sigma) / math.sqrt(got.numel()), n
    again, _, _ = _grown_weights(0.5)
    for n, p in sm.mst.parameters().items():
        assert torch.equal(p, again.mst.parameters()[n])  # seeded: the same draw every time


def test_grown_weights_start_at_zero_by_default():
    sm, _, m_before = _grown_weights(0.0)
    for n, p in sm.mst.parameters().items():
        grown = sm.mst.masks()[n] & ~m_before[n]
        assert int(grown.sum()) > 0 and torch.all(p[grown] == 0)


def test_trainer_follows_the_phase_aware_learning_rate(tmp_path):
    from mst_compile.train.loop import train
    from mst_compile.train.options import TrainConfig

    write(tmp_path, "tiny.py", TINY)
    tc = TrainConfig(steps=24, batch_size=2, block_size=32, eval_iters=1, eval_interval=24, log_interval=1,
                     lr=2e-3, warmup_steps=2, lr_schedule="wsd")
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.25, ultra_end=0.75, lr_density_power=0.0)  # the curve alone
    train(tmp_path / "tiny.py", tc, cfg, out=tmp_path / "run", progress=False)
    lrs = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    for step, lr in lrs.items():
        t = step - 1  # the record of step k holds the lr of iteration k - 1
        if t < 2:
            want = 2e-3 * (t + 1) / 3
        elif t < 18:
            want = 2e-3
        else:
            u = (t - 18) / 6
            want = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * u))
        assert lr == pytest.approx(want), step


def test_restoration_shapes_bring_weights_back_late_linearly_or_early():
    from mst_compile.runtime.schedule import Schedule, target_sparsity

    shapes = {name: Schedule(mst_compile.MSTConfig(sparsity=0.9, final_sparsity=0.0, update_interval=10,
                                                   ablation=mst_compile.Ablation(restoration_shape=name)), 1000)
              for name in ("late", "linear", "early")}
    for cfg in shapes.values():  # restoration from 0.9 at step 800 to 0.0 at the last update, step 990
        assert target_sparsity(800, cfg) == pytest.approx(0.9) and target_sparsity(990, cfg) == pytest.approx(0.0)
    assert target_sparsity(895, shapes["late"]) == pytest.approx(0.9 * (1 - 0.5**3))
    assert target_sparsity(895, shapes["linear"]) == pytest.approx(0.45)
    assert target_sparsity(895, shapes["early"]) == pytest.approx(0.9 * 0.5**3)


def test_paper_preset_is_the_published_recipe():
    p = mst_compile.MSTConfig.preset("paper")
    assert (p.update_interval, p.drop_fraction, p.attention_phases) == (100, (0.3, 0.3, 0.3), ("ultra",))
    assert (p.ablation.attention_restore, p.ablation.grow_init_scale, p.final_sparsity) == ("switch", 0.0, 0.5)
    assert mst_compile.MSTConfig.preset("default") == mst_compile.MSTConfig()
    with pytest.raises(ValueError, match=r"preset\('fast'\) is unknown: expected one of default, paper"):
        mst_compile.MSTConfig.preset("fast")
    for field, bad in (("grow_init_scale", -1.0), ("attention_restore", "fade"),
                       ("restoration_shape", "cubic")):
        with pytest.raises(ValueError, match=f"Ablation.{field}="):
            mst_compile.MSTConfig(ablation=mst_compile.Ablation(**{field: bad}))
