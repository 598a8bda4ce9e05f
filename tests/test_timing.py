"""timing.py: step times scaled to a batch by hand, the timed batch, and time_steps with a clock that
ticks once per reading: medians of exactly one tick, every state timed, the model's weights put back."""
import itertools

import pytest
import torch
from _models import tiny_gpt

import mst_compile
from mst_compile.timing import REPEATS, TOKENS_PER_TIMED_STEP, StepTimes, describe, time_steps, timed_batch


def test_step_scales_forward_backward_by_the_sequences():
    st = StepTimes("cpu, 1 thread", 4, 16, {"dense": 2.0, "ultra": 1.0}, {"dense": 0.5, "ultra": 0.25}, {"dense": 3, "ultra": 3})
    assert st.step("dense", 4) == 2.5 and st.step("dense", 8) == 4.5 and st.step("ultra", 2) == 0.75
    assert st.as_dict()["forward_backward"] == {"dense": 2.0, "ultra": 1.0}


def test_timed_batch_and_describe():
    assert timed_batch(8, 64) == 8
    assert timed_batch(1000, 64) == TOKENS_PER_TIMED_STEP // 64
    assert timed_batch(4, 10 * TOKENS_PER_TIMED_STEP) == 1
    assert describe(torch.device("cpu")) == f"cpu, {torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() != 1 else "")


def test_time_steps_times_each_state_and_trains_nothing():
    torch.manual_seed(0)
    model = tiny_gpt()
    sm = mst_compile.sparsify(model, mst_compile.MSTConfig(sparse_kernel="dense"), total_steps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ticks = itertools.count()
    site = next(iter(sm.mst.attention_modules()))
    st = time_steps(model, sm, lambda t: t, {"warmup": (0.5, {}), "ultra": (0.8, {site: ("local", 4)})},
                    batch_size=3, block_size=8, device=torch.device("cpu"), clock=lambda: float(next(ticks)))
    assert st.batch_size == 3 and st.block_size == 8
    assert st.forward_backward == st.optimizer == {"dense": 1.0, "warmup": 1.0, "ultra": 1.0}  # one tick each
    assert st.repeats == {"dense": REPEATS, "warmup": REPEATS, "ultra": REPEATS}
    assert sm.mst.density() == pytest.approx(0.2, abs=0.01) and sm.mst.attention_patterns()[site] == "local"
    for k, v in model.state_dict().items():  # lr 0 steps and the saved weights put back
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
