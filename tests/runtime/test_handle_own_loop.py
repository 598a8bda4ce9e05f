"""The own-loop contract: attach vs a hand-driven sm.mst.step(), and the README loop itself."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _models import tiny_gpt

import mst_compile

ROOT = Path(__file__).resolve().parents[2]
CFG = mst_compile.MSTConfig(update_interval=2, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25,
                            ultra_end=0.75)


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]


def _run(make_opt, attach, skip=(), steps=12):
    """Train a tiny GPT; ``attach(sm, opt)`` returns a function called after each step that was taken."""
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=12, seed=3)
    opt = make_opt(sm.parameters())
    after = attach(sm, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i, b in enumerate(_batches(steps)):
        logits = sm(b[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, 64), b[:, 1:].reshape(-1))
        if i in skip:
            loss = loss * float("inf")  # the scaler skips this step
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if scaler.get_scale() >= scale:  # the scale only drops when the step was skipped
            after()
    return sm


def _hooked(sm, opt):
    sm.mst.attach(opt)
    return lambda: None


def _manual(sm, opt):
    sm.mst.attach(opt, manual=True)
    return sm.mst.step


def _same(a, b):
    assert a.mst.step_count == b.mst.step_count
    for n, m in a.mst.masks().items():
        assert torch.equal(m, b.mst.masks()[n]), f"mask of {n} differs"
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), f"weight {n} differs"
    assert a.mst.last_update == b.mst.last_update and a.mst.flops.as_dict() == b.mst.flops.as_dict()


@pytest.mark.parametrize("fused", [False, True])  # a fused optimizer runs a skipped step and skips inside
@pytest.mark.parametrize("skip", [(), (3, 7)])
def test_manual_step_equals_the_optimizer_hook(skip, fused):
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused)
    hooked, manual = _run(adamw, _hooked, skip), _run(adamw, _manual, skip)
    assert hooked.mst.step_count == 12 - len(skip) and hooked.mst.last_update is not None
    _same(hooked, manual)


def test_step_without_a_torch_optimizer():
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1)  # (no state: nothing to reset)

    def no_optimizer(sm, opt):
        sm.mst.attach(None)  # the loop steps something MST does not see
        return sm.mst.step

    _same(_run(sgd, _hooked), _run(sgd, no_optimizer))


def test_step_misuse_is_a_clear_error():
    sm = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=12, seed=3)
    with pytest.raises(mst_compile.MstCompileError, match=r"not attached; call sm.mst.attach\(optimizer, manual=True\)"):
        sm.mst.step()
    sm.mst.attach(torch.optim.SGD(sm.parameters(), lr=0.1))
    with pytest.raises(mst_compile.MstCompileError, match="count each step twice"):
        sm.mst.step()
    assert sm.mst.step_count == 0


def test_readme_loop_is_the_example_and_resumes_exactly(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use it from your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code == (ROOT / "examples" / "own_loop.py").read_text(), "README's loop must be examples/own_loop.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), "--steps", "12", *a],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    whole = run("--ckpt", "whole.pt")
    assert whole.returncode == 0, whole.stderr
    assert "step 12: loss" in whole.stdout and "phase restoration" in whole.stdout
    first = run("--ckpt", "split.pt", "--stop-after", "5")
    assert first.returncode == 0, first.stderr
    assert torch.load(tmp_path / "split.pt", weights_only=True)["step"] == 5
    second = run("--ckpt", "split.pt")
    assert second.returncode == 0, second.stderr
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("whole.pt", "split.pt"))
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["mst"]["masks"]:
        assert torch.equal(a["mst"]["masks"][k], b["mst"]["masks"][k]), k
