"""mstc train --precision bf16 / fp16 on CPU (CPU autocast), and fp16 steps the grad scaler skips."""
import json

import pytest
import torch
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.train.metrics import read_jsonl
from mst_compile.train.options import TrainConfig
from mst_compile.train.precision import Precision

# a gradient hook on a dense weight that overflows the backward passes listed in INF_AT (1-based)
INF_AT = (4, 9)
OVERFLOW = TINY + f'''
import torch
_calls = [0]
_orig = model

def model():
    m = _orig()

    def hook(g):
        _calls[0] += 1
        return g * float("inf") if _calls[0] in {INF_AT!r} else g
    m.ln_f.weight.register_hook(hook)
    return m
'''

STEPS = 12


def _train(tmp_path, source, *flags, name="run"):
    f = write(tmp_path, "m.py", source)
    out = tmp_path / name
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(out), "--quiet", "--steps", str(STEPS),
                                  "--update-interval", "2", *flags])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "summary.json").read_text())


def _masked_weights_are_zero(ck):
    """Every sparse weight in the checkpoint is exactly 0 off its mask, and stored as fp32."""
    masks = ck["mst"]["mst"]["masks"]
    assert masks
    for name, mask in masks.items():
        w = ck["model"][name]
        assert w.dtype == torch.float32, f"{name} is stored as {w.dtype}: the master weights must stay fp32"
        assert torch.count_nonzero(w[~mask]) == 0, f"{name} has non-zero weights off its mask"
        assert not bool(mask.all()), f"{name} should be sparse in this run"


def test_bf16_trains_with_fp32_master_weights(tmp_path):
    out, s = _train(tmp_path, TINY, "--precision", "bf16")
    _, fp32 = _train(tmp_path, TINY, name="fp32")
    assert s["sharding"] == "none" and s["world_size"] == 1
    assert s["precision"] == "bf16" and fp32["precision"] == "fp32" and s["skipped_steps"] == 0
    assert abs(s["val_loss"] - fp32["val_loss"]) < 0.05, (s["val_loss"], fp32["val_loss"])  # same run, bf16 rounding
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["mst"]["mst"]["step"] == STEPS
    _masked_weights_are_zero(ck)
    assert "precision = \"bf16\"" in (out / "config.toml").read_text()


def test_fp16_skipped_steps_do_not_advance_mst(tmp_path):
    out, s = _train(tmp_path, OVERFLOW, "--precision", "fp16")
    assert s["skipped_steps"] == len(INF_AT) and s["steps"] == STEPS
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["mst"]["mst"]["step"] == STEPS, "each skipped step was redone, so MST counted every real step once"
    assert ck["precision"]["skipped"] == len(INF_AT)
    assert ck["precision"]["scaler"]["scale"] == 2.0**16 / 2 ** len(INF_AT)  # backed off once per skip
    _masked_weights_are_zero(ck)
    updates = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "update"]
    assert [u["step"] for u in updates] == list(range(2, 2 * len(updates) + 1, 2)) and len(updates) >= 4
    assert not any(u["gradient_fallback"] for u in updates), "an overflowed gradient reached a topology update"
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS


def test_skip_detection_and_state():
    p = Precision("fp16", torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    p.backward((w * float("inf")).sum())
    assert not p.step(opt) and torch.equal(w.detach(), torch.ones(3)) and p.skipped == 1
    opt.zero_grad()
    p.backward(w.sum())
    assert p.step(opt) and not torch.equal(w.detach(), torch.ones(3))
    q = Precision("fp16", torch.device("cpu"))
    q.load_state_dict(p.state_dict())
    assert q.skipped == 1 and q.scaler.get_scale() == p.scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Precision("fp32", "cpu").autocast().__enter__() is None
    with Precision("bf16", "cpu").autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")


def test_bad_precision_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.precision='fp8' is invalid: expected fp32 or bf16 or fp16"):
        TrainConfig(precision="fp8")
    f = write(tmp_path, "m.py", TINY)
    r = CliRunner().invoke(main, ["train", str(f), "--precision", "int8"])
    assert r.exit_code == 2 and "'int8' is not one of" in r.output
