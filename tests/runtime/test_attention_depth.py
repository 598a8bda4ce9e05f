"""MSTConfig.attention_depth: the first share of a model's attention sites, in model order, keep the
sparse pattern and the deeper ones run dense causal attention; checked against hand-written sites and
against the same choice written as per-site glob rules."""
import pytest
import torch
import torch.nn.functional as F
from _models import load_example

import mst_compile
from mst_compile.config import MSTConfig

SITES4 = [f"h.{i}.attn" for i in range(4)]


@pytest.mark.parametrize("depth,sparse", [
    (1.0, SITES4), (0.5, SITES4[:2]), (0.3, SITES4[:2]), (0.25, SITES4[:1]), (0.01, SITES4[:1]), (0.0, []),
])
def test_depth_keeps_the_first_share_of_sites_rounded_up(depth, sparse):
    c = MSTConfig(attention_depth=depth)
    for phase in ("warmup", "ultra", "restoration"):
        got = {s: c.attention_pattern(s, phase, SITES4) for s in SITES4}
        assert got == {s: "sparse" if s in sparse else "dense" for s in SITES4}, phase


def test_depth_follows_the_given_order_not_the_names():
    order = [f"h.{i}.attn" for i in range(12)]  # sorted by name, h.10 and h.11 would come before h.2
    c = MSTConfig(attention_depth=0.5)
    assert [s for s in order if c.attention_pattern(s, "ultra", order) == "sparse"] == order[:6]


def test_depth_keeps_attention_phases_and_rules_win():
    c = MSTConfig(attention_depth=0.5, attention_phases=("ultra",),
                  attention_sites={"h.3.attn": {"ultra": "local"}, "h.0.attn": {"ultra": "dense"}})
    got = {(s, p): c.attention_pattern(s, p, SITES4) for s in SITES4 for p in ("warmup", "ultra")}
    assert got == {("h.0.attn", "warmup"): "dense", ("h.0.attn", "ultra"): "dense",
                   ("h.1.attn", "warmup"): "dense", ("h.1.attn", "ultra"): "sparse",
                   ("h.2.attn", "warmup"): "dense", ("h.2.attn", "ultra"): "dense",
                   ("h.3.attn", "warmup"): "dense", ("h.3.attn", "ultra"): "local"}


@pytest.mark.parametrize("value", [1.5, -0.1, "half", None])
def test_bad_depth_names_field_value_and_range(value):
    with pytest.raises(ValueError, match=r"MSTConfig.attention_depth=.* is invalid: expected a fraction of the "
                                         r"attention sites in \[0, 1\]"):
        MSTConfig(attention_depth=value)


def test_depth_without_the_sites_order_says_so():
    with pytest.raises(ValueError, match="attention_depth=0.5 needs the model's attention sites in order"):
        MSTConfig(attention_depth=0.5).attention_pattern("h.0.attn", "ultra")
    with pytest.raises(ValueError, match="'blocks.0' is not one of"):
        MSTConfig(attention_depth=0.5).attention_pattern("blocks.0", "ultra", SITES4)


def _train(cfg, steps=12):
    """Train a 4-block tiny GPT under cfg; the patterns each site ran per step and the final logits."""
    torch.manual_seed(0)
    net = load_example("tiny_gpt").GPT(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_embd=32)
    sm = mst_compile.sparsify(net, cfg, total_steps=steps)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(steps):
        seen.append((sm.mst.phase, dict(sm.mst.attention_patterns())))
        x = torch.randint(0, 64, (2, 17), generator=g)
        F.cross_entropy(sm(x[:, :-1]).reshape(-1, 64), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        out = sm(torch.randint(0, 64, (2, 16), generator=g))
    return seen, out, sm.mst.flops.mst_total


def test_a_run_at_depth_half_is_the_run_with_the_deeper_sites_ruled_dense():
    base = dict(update_interval=2, warmup_end=0.25, ultra_end=0.75, stride=4)
    seen, out, flops = _train(MSTConfig(attention_depth=0.5, **base))
    ref_seen, ref_out, ref_flops = _train(MSTConfig(attention_sites={"h.[23].attn": "dense"}, **base))
    assert {ph for ph, _ in seen} == {"warmup", "ultra", "restoration"}
    assert all(p == {"h.0.attn": "sparse", "h.1.attn": "sparse", "h.2.attn": "dense", "h.3.attn": "dense"}
               for _, p in seen)
    assert seen == ref_seen
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert flops == ref_flops



def test_the_plan_counts_depth_in_model_order(monkeypatch, tmp_path):
    """Every site of a GPT costs the same, so the totals cannot tell which sites ran dense: record them."""
    from mst_compile.runtime import schedule

    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    seen = {}
    real = schedule.site_pattern

    def spy(site, step, sched, sites=None):
        seen[site] = got = real(site, step, sched, sites)
        return got

    monkeypatch.setattr(schedule, "site_pattern", spy)
    net = load_example("tiny_gpt").GPT(vocab_size=64, block_size=32, n_layer=12, n_head=2, n_embd=16)
    cfg = MSTConfig(update_interval=4, warmup_end=0.25, stride=4, attention_depth=0.5)
    p = mst_compile.plan(net, 64 * 40, config=cfg, block_size=32, batch_size=2, hardware="h100")
    assert p.steps == 40 and len(seen) == 12
    assert {s for s, (pattern, _) in seen.items() if pattern == "sparse"} == {f"h.{i}.attn" for i in range(6)}
