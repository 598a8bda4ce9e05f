"""train/accounting.py: the dense baseline's FLOPs per token against 6·n_in·n_out by hand, both
accountings' totals and checkpoint state, the world-size scaling, and the topology updates reported once."""
from types import SimpleNamespace

import pytest
import torch
from _models import MLP

import mst_compile
from mst_compile.errors import CheckpointError
from mst_compile.train.accounting import DenseAccounting, MSTAccounting, build, dense_flops_per_token

CFG = mst_compile.MSTConfig(update_interval=2, sparsity=0.8, warmup_end=0.25, ultra_end=0.75, sparse_kernel="dense")
STEPS = 12
MLP_WORK = 16 * 64 + 64 * 8  # n_in·n_out of fc1 and fc2


def test_dense_flops_per_token_is_six_times_the_weights():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    assert dense_flops_per_token(MLP(), CFG, x, x) == pytest.approx(6 * MLP_WORK)


def test_dense_accounting_charges_per_token_and_round_trips():
    acct = DenseAccounting(torch.nn.Linear(2, 2), world=1, per_token=10.0)
    acct.after_step(3)
    acct.after_step(5)
    assert acct.flops() == {"mst_flops": 80.0, "dense_flops": 80.0}
    assert acct.reduction() == 1.0 and acct.phase == "dense" and acct.density() == 1.0 and acct.new_updates() == []
    sd = acct.state_dict()
    assert sd == {"dense": True, "tokens": 8, "dense_total": 80.0, "mst": None}
    again = DenseAccounting(torch.nn.Linear(2, 2), world=1, per_token=10.0)
    again.load_state_dict(sd, "ckpt.pt")
    again.after_step(1)
    assert again.tokens == 9 and again.flops()["dense_flops"] == 90.0


def _mst(world=1):
    torch.manual_seed(0)
    sm = mst_compile.sparsify(MLP(), CFG, total_steps=STEPS, seed=0)
    acct = MSTAccounting(sm, world)
    opt = torch.optim.SGD(sm.parameters(), lr=0.05)
    acct.attach(opt)
    return acct, opt


def _step(acct, opt, x):
    acct.module(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    acct.after_step(x.shape[0])


def test_mst_accounting_reports_the_handle_scaled_by_the_world():
    x = torch.randn(4, 16)
    one, opt1 = _mst(world=1)
    two, opt2 = _mst(world=2)
    updates = []
    for _ in range(3):
        _step(one, opt1, x)
        _step(two, opt2, x)
        updates += one.new_updates()
    f1, f2 = one.flops(), two.flops()
    assert f2["mst_flops"] == pytest.approx(2 * f1["mst_flops"]) and f2["dense_flops"] == pytest.approx(2 * f1["dense_flops"])
    assert f1["dense_flops"] == pytest.approx(3 * 4 * 6 * MLP_WORK)  # 3 steps of 4 rows, dense
    assert one.density() == pytest.approx(sum(int(m.sum()) for m in one.mst.masks().values()) / MLP_WORK)
    assert [u["step"] for u in updates] == [2]  # one update (at step 2), reported once
    assert one.new_updates() == []
    assert one.phase == one.mst.phase and not one.dense


def test_checkpoints_of_the_other_kind_are_refused_and_mst_state_resumes():
    x = torch.randn(4, 16)
    acct, opt = _mst()
    for _ in range(3):
        _step(acct, opt, x)
    sd = acct.state_dict()
    assert sd["dense"] is False and sd["tokens"] == 12 and sd["mst"]["step"] == 3
    with pytest.raises(CheckpointError, match="ckpt.pt belongs to an MST run; this run is dense"):
        DenseAccounting(torch.nn.Linear(2, 2), 1, 1.0).load_state_dict(sd, "ckpt.pt")
    fresh, _ = _mst()
    with pytest.raises(CheckpointError, match="belongs to a dense baseline; this run is MST"):
        fresh.load_state_dict({"dense": True, "tokens": 0, "dense_total": 0.0, "mst": None}, "ckpt.pt")
    fresh.load_state_dict(sd, "ckpt.pt")
    assert fresh.tokens == 12 and fresh.mst.step_count == 3 and fresh.flops() == acct.flops()
    assert fresh.new_updates() == []  # the update before the interruption was already logged


@pytest.mark.parametrize("dense", [True, False])
def test_build_picks_the_accounting(dense):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    acct = build(MLP(), CFG, SimpleNamespace(dense=dense, schedule_steps=STEPS, seed=0), x, x, SimpleNamespace(world=1, device=torch.device("cpu")))
    assert acct.dense is dense and type(acct) is (DenseAccounting if dense else MSTAccounting)
    torch.testing.assert_close(acct.module(x), acct.module(x))
    if dense:
        acct.after_step(4)
        assert acct.flops()["dense_flops"] == pytest.approx(4 * 6 * MLP_WORK)
    else:
        assert acct.mst is acct.module.mst
