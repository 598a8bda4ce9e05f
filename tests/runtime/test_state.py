"""The scheduler's checkpoint state (MSTScheduler.state_dict / load_state_dict): every field a resume needs
survives torch.save with weights_only=True; masks that do not fit, and foreign dicts, are refused; a
different config warns; a restored scheduler draws the same random growth as the one that saved."""
import io
import warnings

import pytest
import torch
from _models import MLP

import mst_compile
from mst_compile.errors import CheckpointError

CFG = dict(update_interval=2, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25, ultra_end=0.75,
           grow_gradient_fraction=0.0, sparse_kernel="dense")  # all growth random: the generator matters


def _sm(seed=0, total_steps=12, **kw):
    torch.manual_seed(seed)
    sm = mst_compile.sparsify(MLP(), mst_compile.MSTConfig(**{**CFG, **kw}), total_steps=total_steps, seed=3)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    sm.mst.attach(opt)
    return sm, opt


def _steps(sm, opt, n, x):
    for _ in range(n):
        sm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_restores_masks_step_ledger_and_growth():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    sm, opt = _sm()
    _steps(sm, opt, 5, x)
    state = _roundtrip(sm.mst.state_dict())
    assert state["step"] == 5 and set(state["masks"]) == set(sm.mst.masks())
    assert all(m.device.type == "cpu" and m.dtype == torch.bool for m in state["masks"].values())

    other, other_opt = _sm(seed=7)  # different weights, fresh state
    other.load_state_dict(sm.state_dict())
    other_opt.load_state_dict(opt.state_dict())
    other.mst.load_state_dict(state)
    assert other.mst.step_count == 5 and other.mst.phase == sm.mst.phase
    assert other.mst.flops.as_dict() == sm.mst.flops.as_dict()
    assert other.mst.last_update == sm.mst.last_update
    for n, m in sm.mst.masks().items():
        assert torch.equal(other.mst.masks()[n], m)

    _steps(sm, opt, 4, x)  # two more updates, each growing at random
    _steps(other, other_opt, 4, x)
    for n, m in sm.mst.masks().items():
        assert torch.equal(other.mst.masks()[n], m)  # the growth generator was restored
    for a, b in zip(sm.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_loading_zeroes_the_weights_the_masks_drop():
    sm, _ = _sm()
    sm.mst.set_sparsity(0.9)
    state = sm.mst.state_dict()
    fresh, _ = _sm(seed=5)
    fresh.mst.load_state_dict(state)
    for n, p in fresh.mst.parameters().items():
        assert torch.all(p.detach()[~state["masks"][n]] == 0)
    assert fresh.mst.density() == pytest.approx(sm.mst.density())


def test_foreign_state_and_misfit_masks_are_refused():
    sm, _ = _sm()
    with pytest.raises(CheckpointError, match="expected a dict from sm.mst.state_dict"):
        sm.mst.load_state_dict({"step": 3})
    state = sm.mst.state_dict()
    name = next(iter(state["masks"]))
    state["masks"][name] = state["masks"][name][:, :-1]
    with pytest.raises(CheckpointError):
        sm.mst.load_state_dict(state)
    state = sm.mst.state_dict()
    del state["masks"][name]
    with pytest.raises(CheckpointError):
        sm.mst.load_state_dict(state)


def test_a_different_config_warns_and_the_current_one_rules():
    sm, _ = _sm()
    state = sm.mst.state_dict()
    longer, _ = _sm(total_steps=24)
    with pytest.warns(UserWarning, match=r"total_steps: 12 -> 24"):
        longer.mst.load_state_dict(state)
    assert longer.mst.schedule.total_steps == 24
    same, _ = _sm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.mst.load_state_dict(state)


def test_pinned_attention_is_part_of_the_state():
    from _models import tiny_gpt

    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(), total_steps=10, seed=0)
    site = next(iter(sm.mst.attention_modules()))
    sm.mst.set_attention({site: "local"})
    state = _roundtrip(sm.mst.state_dict())
    torch.manual_seed(0)
    fresh = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(), total_steps=10, seed=0)
    fresh.mst.load_state_dict(state)
    assert fresh.mst.attention_patterns()[site] == "local"
