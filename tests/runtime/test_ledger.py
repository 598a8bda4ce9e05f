"""FLOP ledger (docs/design.md §6) against FlopCounterMode, the attention mask oracle and closed forms."""
import math

import pytest
import torch
from _models import MLP, SpellingsLM, hf_gpt2, hf_llama, tiny_gpt, transposed_head_gpt
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mst_compile
from mst_compile.ops.attention import pattern_mask
from mst_compile.runtime.density import allocate
from mst_compile.runtime.ledger import count_tokens

B, TT = 3, 16
aten = torch.ops.aten


def _step(sm, opt, x):
    sm(x).float().square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_dense_count_matches_flop_counter_mode():
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), {"update_interval": 5, "attention_phases": ["ultra"], "warmup_end": 0.1}, total_steps=100)  # step 1: dense
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)
    x = torch.randint(0, 64, (B, TT))
    _step(sm, opt, x)
    f = sm.mst.flops
    # the same architecture written with explicit matmuls, so FlopCounterMode sees every op
    ref = tiny_gpt(flash=False)
    with FlopCounterMode(display=False) as fc:
        ref(x).square().mean().backward()
    counts = fc.get_flop_counts()["Global"]
    linear = counts[aten.mm] + counts[aten.addmm]
    attention = counts[aten.bmm] * (TT + 1) / (2 * TT)  # FlopCounterMode counts the full T×T square
    assert f.last_step_dense == pytest.approx(linear + attention, rel=1e-12)
    assert f.last_step_mst == f.last_step_dense, "a dense start costs what the dense model costs"
    assert f.tokens == f.last_step_tokens == B * TT and f.reduction == 1.0


def test_mst_count_uses_densities_and_the_attention_pattern():
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=40, warmup_end=0.0, sparsity=0.75,
                                attention="local", stride=4, attention_depth=1.0)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=100)
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)
    assert sm.mst.phase == "ultra" and set(sm.mst.attention_patterns().values()) == {"local"}
    _step(sm, opt, torch.randint(0, 64, (B, TT)))
    f = sm.mst.flops
    linear = sum(6.0 * B * TT * int(m.sum()) for m in sm.mst.masks().values())
    keys = int(pattern_mask(TT, 4, "local").sum())  # Σ over queries of the keys attended
    n_layer, n_head, d_head = 2, 2, 16
    attention = n_layer * 12.0 * d_head * n_head * B * keys
    assert f.last_step_mst == pytest.approx(linear + attention, rel=1e-12)
    assert f.linear_mst == pytest.approx(linear) and f.attention_mst == pytest.approx(attention)


def _mlp_run(cfg, steps, batch=5, total_steps=None):
    torch.manual_seed(0)
    sm = mst_compile.sparsify(MLP(), cfg, total_steps=total_steps or steps)
    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.mst.attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        _step(sm, opt, torch.randn(batch, 16, generator=g))
    return sm


def test_reduction_closed_form_constant_sparsity():
    # uniform 0.75 on 16x64 and 64x8 weights keeps exactly a quarter; the dense gradient is formed on
    # the 2 steps before the 2 updates (4, 8; none after the last step): reduction = 6T / (6dT + 2(1-d)·2)
    cfg = mst_compile.MSTConfig(update_interval=4, schedule=[(0, 0.75), (12, 0.75)], distribution="uniform")
    sm = _mlp_run(cfg, 12)
    d = 0.25
    assert sm.mst.density() == d
    assert sm.mst.flops.reduction == pytest.approx(6 * 12 / (6 * d * 12 + 2 * (1 - d) * 2), rel=1e-12)
    assert sm.mst.flops.dense_total == pytest.approx(12 * 5 * 6 * (16 * 64 + 64 * 8))


def test_reduction_closed_form_three_phases():
    T, dT = 30, 3
    cfg = mst_compile.MSTConfig(update_interval=dT, sparsity=0.9, final_sparsity=0.5, warmup_end=0.2,
                                ultra_end=0.7, distribution="uniform")
    sm = _mlp_run(cfg, T)
    from mst_compile.runtime.schedule import drop_fraction, target_sparsity
    shapes = {"fc1.weight": (64, 16), "fc2.weight": (8, 64)}
    N = {n: s[0] * s[1] for n, s in shapes.items()}
    mst = dense = 0.0
    for k in range(1, T + 1):  # optimizer step k runs with the masks of the last update before it
        last = (k - 1) // dT * dT
        counts = allocate(shapes, target_sparsity(last, sm.mst.schedule), "uniform")
        # a weight forms the dense gradient in iteration k when the update after step k < T grows it by
        # gradient: n_grow = n_prune − Δ with n_prune = max(⌊ζ·n_act⌋, Δ), and round(0.75·n_grow) > 0
        nxt = allocate(shapes, target_sparsity(k, sm.mst.schedule), "uniform")
        grows = {n: max(math.floor(drop_fraction(k, sm.mst.schedule) * counts[n]), counts[n] - nxt[n]) - (counts[n] - nxt[n]) for n in N}
        probe = {n: k % dT == 0 and k < T and math.floor(0.75 * grows[n] + 0.5) > 0 for n in N}
        mst += sum(6 * counts[n] + (2 * (N[n] - counts[n]) if probe[n] else 0) for n in N)
        dense += sum(6 * N[n] for n in N)
    assert sm.mst.flops.reduction == pytest.approx(dense / mst, rel=1e-12)
    assert sm.mst.flops.steps == T


def test_tokens_come_from_the_inputs_and_eval_is_not_charged():
    sm = _mlp_run(mst_compile.MSTConfig(update_interval=3, warmup_end=0.6, ultra_end=0.6), 0, total_steps=10)
    opt = sm.mst._scheduler.optimizer
    with torch.no_grad():
        sm(torch.randn(7, 16))  # evaluation: no training FLOPs
    sm(torch.randn(2, 3, 16)).sum().backward()  # two micro-batches of one step: (2, 3) and (4,) rows
    sm(torch.randn(4, 16)).sum().backward()
    opt.step()
    f = sm.mst.flops
    assert f.tokens == f.last_step_tokens == 10
    assert f.last_step_dense == 10 * 6 * (16 * 64 + 64 * 8)
    assert count_tokens((torch.zeros(4, 9, dtype=torch.long),), {}) == 36
    assert count_tokens((), {"input_ids": torch.zeros(2, 5, dtype=torch.long), "mask": torch.ones(2, 5)}) == 10
    assert count_tokens((torch.zeros(3, 5, 8),), {}) == 15


def test_excluded_and_as_dict():
    sm = _mlp_run(mst_compile.MSTConfig(update_interval=3, warmup_end=0.6, ultra_end=0.6), 2, total_steps=10)
    f = sm.mst.flops
    assert f.excluded == [("ops that are not matmuls: embedding lookups, norms, activations, residual adds, the loss "
                           "and the optimizer update")]
    d = f.as_dict()
    assert d["reduction"] == f.reduction and d["mst_total"] == f.mst_total and d["excluded"] == f.excluded
    # a site excluded by filter_fn is listed as skipped and charged dense, not left out of the count
    gpt = mst_compile.sparsify(tiny_gpt(), filter_fn=lambda m, fqn: "mlp" not in fqn)
    assert any("mlp" in s and "filter_fn" in why for s, why in gpt.mst.skipped)
    assert not any("mlp" in e for e in gpt.mst.flops.excluded)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _flop_counter(model, x, kw):
    """FlopCounterMode's training FLOPs (forward + backward) of the plain model: (mm, bmm).

    SDPA runs its math kernel so every attention matmul is a counted bmm (in the models with
    attention, bmm is attention); FlopCounterMode counts the full T×T square even when causal."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _logits(model(**{kw: x}) if kw else model(x)).float().square().mean().backward()
    model.zero_grad()
    c = fc.get_flop_counts()["Global"]
    return c.get(aten.mm, 0) + c.get(aten.addmm, 0), c.get(aten.bmm, 0) + c.get(aten.baddbmm, 0)


MODELS = {  # name: (make, vocab, keyword of the token input, has attention)
    "spellings": (SpellingsLM, 40, None, False),
    "tiny_gpt": (tiny_gpt, 64, None, True),
    "transposed_head_gpt": (transposed_head_gpt, 64, None, True),
    "hf_gpt2": (hf_gpt2, 64, "input_ids", True),
    "hf_llama": (hf_llama, 64, "input_ids", True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_total_is_the_whole_model_flop_counter_count(name):
    """Ledger dense per step == FlopCounterMode forward + backward over the whole model, attention put
    on the ledger's causal footing: (T + 1)/2 keys per query instead of FlopCounterMode's T."""
    make, vocab, kw, has_attention = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randint(0, vocab, (B, TT), generator=torch.Generator().manual_seed(0))
    mm, bmm = _flop_counter(model, x, kw)
    sm = mst_compile.sparsify(model, {"update_interval": 5, "attention_phases": ["ultra"], "warmup_end": 0.1}, total_steps=100,
                              example_inputs={kw: x} if kw else (x,))  # step 1: dense weights, dense attention
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)
    _logits(sm(**{kw: x}) if kw else sm(x)).float().square().mean().backward()
    opt.step()
    f = sm.mst.flops
    expected = mm + bmm * ((TT + 1) / (2 * TT) if has_attention else 1.0)  # no attention: bmm of einsum, bmm
    assert f.last_step_dense == pytest.approx(expected, rel=0.02), f"ledger / FlopCounterMode = {f.last_step_dense / expected:.4f}"
    assert f.last_step_mst == f.last_step_dense, "a dense start costs what the dense model costs"
    measured = sm.mst.measure_flops(**{kw: x}) if kw else sm.mst.measure_flops(x)
    assert measured == (f.last_step_mst, f.last_step_dense, B * TT)


def test_sparse_total_counts_every_use_of_every_weight():
    """At a known density: Σ over uses of 6·rows·active, from the model's own definition."""
    cfg = mst_compile.MSTConfig(update_interval=50, schedule=[(0, 0.75), (100, 0.75)],
                                distribution="uniform")
    torch.manual_seed(0)
    sm = mst_compile.sparsify(SpellingsLM(), cfg, total_steps=100)
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)
    _step(sm, opt, torch.randint(0, 40, (B, TT)))
    uses = {"w_t": 2}  # F.linear(h, w_t) and h @ w_t.t(); every other weight is used once, on B·T rows
    active = {n: int(m.sum()) for n, m in sm.mst.masks().items()}
    assert all(a == round(0.25 * sm.mst.parameters()[n].numel()) for n, a in active.items())
    expected = sum(6.0 * B * TT * a * uses.get(n, 1) for n, a in active.items())
    assert sm.mst.flops.last_step_mst == pytest.approx(expected, rel=1e-12)


def test_a_dense_head_cannot_inflate_the_reduction():
    """Regression: a tiny GPT whose tied head ``h @ wte.weight.T`` holds most of the weights (a large
    vocabulary). With the head rewritten it is charged sparse; kept dense (filter_fn) it is charged
    dense on both sides, so the reduction is the whole-model figure (a ledger that left the head out
    of both totals reported about 10x where the honest figure is below 2x)."""
    cfg = mst_compile.MSTConfig(update_interval=50, schedule=[(0, 0.9), (100, 0.9)],
                                attention_phases=())
    vocab = 2048
    x = torch.randint(0, vocab, (B, TT))
    attention = 2 * 12.0 * 32 * B * TT * (TT + 1) / 2  # 2 layers, d_head · n_heads = 32, dense causal
    head = vocab * 32  # wte.weight, vocab × n_embd
    for keep_head_dense in (False, True):
        torch.manual_seed(0)
        model = transposed_head_gpt(vocab)
        sm = mst_compile.sparsify(model, cfg, total_steps=100, filter_fn=(lambda m, fqn: fqn != "wte") if keep_head_dense else None)
        assert ("wte.weight" in sm.mst.parameters()) != keep_head_dense
        opt = torch.optim.SGD(sm.parameters(), lr=0.0)
        sm.mst.attach(opt)
        _step(sm, opt, x)
        f = sm.mst.flops
        weights = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "wpe.weight"}
        active = {n: int(m.sum()) for n, m in sm.mst.masks().items()}
        dense = 6.0 * B * TT * sum(weights.values()) + attention
        mst = 6.0 * B * TT * sum(active.get(n, w) for n, w in weights.items()) + attention
        assert f.last_step_dense == pytest.approx(dense, rel=1e-12)
        assert f.last_step_mst == pytest.approx(mst, rel=1e-12)
        assert "wte.weight" in weights and f.reduction == pytest.approx(dense / mst, rel=1e-12)
        if keep_head_dense:  # what leaving the head out of both totals would have claimed
            inflated = (dense - 6.0 * B * TT * head) / (mst - 6.0 * B * TT * head)
            assert f.reduction < 2.0 < 0.5 * inflated
