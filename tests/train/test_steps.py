"""train/steps.py: how a batch reaches the model, the check of one forward before anything is written
(each wrong model or vocabulary named in one line), and Ctrl-C: the first asks to stop, the second aborts."""
import os
import signal

import pytest
import torch
from torch import nn

from mst_compile.errors import MstCompileError
from mst_compile.train.steps import StopRequest, check_model_runs, run_model


class Data:
    def __init__(self, ids):
        self._ids = ids

    def id_range(self):
        return self._ids

    def origin(self):
        return "data.txt"


def _lm(vocab=10, out=None):
    return nn.Sequential(nn.Embedding(vocab, 4), nn.Linear(4, out or vocab))


def test_run_model_passes_the_batch_as_inputs_packs_it():
    x = torch.randint(0, 10, (2, 5))
    seen = {}

    class KW(nn.Module):
        def forward(self, idx, scale=1.0):
            seen["scale"] = scale
            return idx * scale

    assert torch.equal(run_model(KW(), lambda t: {"idx": t, "scale": 2}, x), x * 2) and seen["scale"] == 2
    assert torch.equal(run_model(KW(), lambda t: (t,), x), x)


def test_a_good_model_passes():
    check_model_runs(_lm(), lambda t: t, torch.randint(0, 10, (2, 5)), Data((0, 9)))
    check_model_runs(_lm(), lambda t: t, torch.randint(0, 10, (2, 5)), Data(None))  # ids known only from the batch


def test_wrong_models_and_vocabularies_are_one_line():
    x = torch.randint(0, 10, (2, 5))
    with pytest.raises(MstCompileError, match=r"^the model returned logits of shape \(5, 4\) for tokens \(2, 5\); "
                                              r"expected \(B, T, vocab\)$") as e:
        check_model_runs(nn.Embedding(10, 4), lambda t: t[0], x, Data((0, 9)))  # drops the batch dim
    assert e.value.__cause__ is None
    with pytest.raises(MstCompileError, match=r"^model\(\) failed on a batch of token ids of shape \(2, 5\): RuntimeError: "):
        check_model_runs(nn.Sequential(nn.Embedding(10, 4), nn.Linear(3, 10)), lambda t: t, x, Data((0, 9)))
    with pytest.raises(MstCompileError, match=r"largest token id is 11 \(data.txt\) but the model predicts only 10 classes; "
                                              r"give the model a vocabulary of at least 12"):
        check_model_runs(_lm(vocab=12, out=10), lambda t: t, x, Data((0, 11)))
    with pytest.raises(MstCompileError, match=r"^the data's largest token id is 12 \(data.txt\) but the model's input embedding 0 "
                                              r"has 10 rows \(ids 0-9\); give the model a vocabulary of at least 13"):
        check_model_runs(_lm(), lambda t: t, x, Data((0, 12)))  # refused before the lookup, not an IndexError
    big = x.clone()
    big[0, 0] = 10
    with pytest.raises(MstCompileError, match=r"^the first batch holds token id 10 \(data.txt\)"):
        check_model_runs(_lm(), lambda t: t, big, Data(None))
    m = _lm()
    check_model_runs(m, lambda t: t, x, Data((0, 9)))
    assert not m[0]._forward_pre_hooks  # the guards are removed afterwards


def test_ctrl_c_asks_to_stop_then_aborts():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
