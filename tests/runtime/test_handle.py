"""sm.mst, the runtime handle: its site list, densities and allocation against counts taken from the masks
themselves, set_sparsity against a magnitude sort, the manual step's contract and set_attention's rules."""
import pytest
import torch
from _models import MLP, tiny_gpt

import mst_compile
from mst_compile.errors import MstCompileError
from mst_compile.runtime.handle import linear_flop_shares


def _mlp(**kw):  # the masked-dense kernel: what is tested here does not depend on the kernel
    torch.manual_seed(0)  # 40 steps: every phase of the default split gets an update every 2 (sparsify checks it)
    return mst_compile.sparsify(MLP(), mst_compile.MSTConfig(update_interval=2, sparse_kernel="dense", **kw),
                                total_steps=40, seed=0)


def test_sites_list_every_sparse_weight_with_its_shape_and_share():
    sm = _mlp()
    lin = {e.name: e for e in sm.mst.sites if e.kind == "linear"}
    assert {e.shape for e in lin.values()} == {(64, 16), (8, 64)}  # fc1, fc2 (out, in)
    assert all(e.params == e.shape[0] * e.shape[1] and e.uses == 1 for e in lin.values())
    shares = linear_flop_shares(sm.mst.sites)
    by_shape = {lin[n].shape: s for n, s in shares.items()}
    assert by_shape[(64, 16)] == pytest.approx(1024 / (1024 + 512))
    assert by_shape[(8, 64)] == pytest.approx(512 / (1024 + 512))
    assert set(sm.mst.parameters()) == set(lin) == set(sm.mst.masks())


def test_densities_are_the_masks_own_counts():
    sm = _mlp()
    assert sm.mst.density() == 1.0  # every weight starts dense
    sm.mst.set_sparsity(0.7)
    masks = sm.mst.masks()
    for n, d in sm.mst.densities().items():
        assert d == pytest.approx(masks[n].float().mean().item())
    total = sum(m.numel() for m in masks.values())
    assert sm.mst.density() == pytest.approx(sum(int(m.sum()) for m in masks.values()) / total)


def test_set_sparsity_keeps_the_largest_weights_and_zeroes_the_rest():
    sm = _mlp()
    before = {n: p.detach().clone() for n, p in sm.mst.parameters().items()}
    sm.mst.set_sparsity(0.8)
    masks = sm.mst.masks()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)  # the allocation is exact
    alloc = sm.mst.allocation(0.8)
    for n, p in sm.mst.parameters().items():
        m, w = masks[n], before[n].abs().flatten()
        assert int(m.sum()) == alloc[n]
        kept = w[m.flatten()]
        dropped = w[~m.flatten()]
        assert kept.min() >= dropped.max()  # a magnitude sort picks the same set
        assert torch.all(p.detach()[~m] == 0) and torch.equal(p.detach()[m], before[n][m])
    with pytest.raises(ValueError, match=r"set_sparsity\(sparsity=1.0\)"):
        sm.mst.set_sparsity(1.0)


def test_manual_step_counts_real_steps_and_runs_updates():
    sm = _mlp(sparsity=0.8, warmup_end=0.2, ultra_end=0.6)
    with pytest.raises(MstCompileError, match="not attached"):
        sm.mst.step()
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.mst.attach(opt, manual=True)
    x = torch.randn(4, 16)
    for i in range(4):
        sm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert sm.mst.step_count == i  # the optimizer hook does nothing in manual mode
        sm.mst.step()
    assert sm.mst.step_count == 4 and sm.mst.last_update is not None
    assert sm.mst.density() < 1.0 and sm.mst.flops.steps == 4
    sm.mst.detach()
    sm.mst.attach(opt)
    with pytest.raises(MstCompileError, match="count each step twice"):
        sm.mst.step()


def test_set_attention_pins_sites_until_handed_back():
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(), total_steps=20, seed=0)
    sites = list(sm.mst.attention_modules())
    assert len(sites) == 2
    sm.mst.set_attention("local")
    assert set(sm.mst.attention_patterns().values()) == {"local"}
    sm.mst.set_attention({sites[0]: "strided"}, stride=4)
    assert sm.mst.attention_patterns()[sites[0]] == "strided" and sm.mst.attention_modules()[sites[0]].stride == 4
    sm.mst.set_attention(None)  # back to the schedule: HSA in the first half of the sites (attention_depth=0.5)
    assert sm.mst.attention_patterns() == {sites[0]: "sparse", sites[1]: "dense"}
    with pytest.raises(ValueError, match="unknown attention sites"):
        sm.mst.set_attention({"nope": "dense"})
    with pytest.raises(ValueError, match="got 1 patterns for 2"):
        sm.mst.set_attention(["dense"])
    sm.mst.set_attention("local")
    with pytest.raises(ValueError, match="unknown attention pattern 'no-such-pattern'"):
        sm.mst.set_attention(["dense", "no-such-pattern"])  # checked before anything changes
    assert set(sm.mst.attention_patterns().values()) == {"local"}


def test_the_old_plan_name_says_where_it_went():
    sm = _mlp()
    with pytest.raises(AttributeError, match="renamed sm.mst.sites"):
        sm.mst.plan  # noqa: B018
    assert "2 sparse weights, 0 attention sites" in repr(sm.mst)
