"""forecast(): the cost of a whole run walked from the schedule, against the ledger of that run really
trained (per phase and per step), and against closed forms of the ledger's formula on a hand-made footprint."""
import pytest
import torch
from _models import MLP, tiny_gpt

import mst_compile
from mst_compile.runtime.forecast import forecast
from mst_compile.runtime.ledger import Footprint
from mst_compile.runtime.schedule import Schedule

CFG = dict(update_interval=2, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25, ultra_end=0.75, sparse_kernel="dense")
STEPS = 16


@pytest.mark.parametrize("make", [MLP, tiny_gpt], ids=["mlp", "tiny_gpt"])
def test_forecast_equals_the_ledger_of_the_run(make):
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(**CFG)
    sm = mst_compile.sparsify(make(), cfg, total_steps=STEPS, seed=0)
    x = torch.randn(4, 16) if make is MLP else torch.randint(0, 64, (2, 16))
    fc = forecast(sm.mst.footprint(x), Schedule(cfg, STEPS), sm.mst.allocation, sm.mst.units(), tokens_per_step=x.shape[0] * (
        1 if make is MLP else x.shape[1]), keep_steps=True)

    opt = torch.optim.SGD(sm.parameters(), lr=0.01)
    sm.mst.attach(opt)
    seen = []
    for _ in range(STEPS):
        out = sm(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        f = sm.mst.flops
        seen.append((f.last_step_mst, f.last_step_dense))
    assert [p.phase for p in fc.phases] == ["warmup", "ultra", "restoration"]
    assert [p.steps for p in fc.phases] == [4, 8, 4]
    assert [p.first_step for p in fc.phases] == [1, 5, 13]
    # flattened: pytest.approx refuses nested sequences
    assert [v for pair in fc.per_step for v in pair] == pytest.approx([v for pair in seen for v in pair], rel=1e-9)
    assert fc.mst_flops == pytest.approx(sm.mst.flops.mst_total, rel=1e-9)
    assert fc.dense_flops == pytest.approx(sm.mst.flops.dense_total, rel=1e-9)
    assert fc.reduction == pytest.approx(sm.mst.flops.reduction, rel=1e-9)


def test_a_handmade_footprint_follows_the_closed_form():
    # one sparse weight of 10x20 seen by 3 rows per forward, no attention, 7 FLOPs of dense work
    fp = Footprint(tokens=3, linear={"w": (3, 200)}, attention=[], dense_ops=7.0)
    cfg = mst_compile.MSTConfig(update_interval=100, schedule=[(0, 0.5), (10, 0.5)],
                                grow_gradient_fraction=0.0)  # flat 50%, no update inside the run
    fc = forecast(fp, Schedule(cfg, 10), lambda s: {"w": round((1 - s) * 200)}, {"w": 200}, tokens_per_step=6)
    per_step_mst = 2 * (3 * 200 * 6 * 0.5 + 7.0)  # tokens_per_step / fp.tokens = 2 forwards a step
    per_step_dense = 2 * (3 * 200 * 6 + 7.0)
    assert fc.mst_flops == pytest.approx(10 * per_step_mst)
    assert fc.dense_flops == pytest.approx(10 * per_step_dense)
    assert sum(p.steps for p in fc.phases) == 10
    assert all(p.density == pytest.approx(0.5) for p in fc.phases)
    assert fc.per_step is None  # only kept when asked for
