"""MST on CUDA tensors (skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them on one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _models import tiny_gpt
from _train_models import TINY, write

import mst_compile
from mst_compile.ops.sparse_linear import sparse_linear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def test_sparse_linear_matches_cpu_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x, w, gy = torch.randn(6, 5, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(6, 5, 48, generator=g)
    mask = torch.rand(48, 32, generator=g) < 0.3
    w = w * mask

    def run(device):
        xs, ws = x.to(device).detach().requires_grad_(), w.to(device).detach().requires_grad_()
        probe = torch.zeros(48, 32, device=device, requires_grad=True)
        y = sparse_linear(xs, ws, mask.to(device), None, probe)
        y.backward(gy.to(device))
        return [t.cpu() for t in (y, xs.grad, ws.grad, probe.grad)]

    for a, b in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(run("cuda")[2][~mask]) == 0


def _train(sm, steps, autocast=None):
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    x = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=autocast) if autocast else torch.autocast("cuda", enabled=False):
            logits = sm(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_mst_trains_on_cuda_with_state_on_the_device(autocast):
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.8, stride=4)
    sm = mst_compile.sparsify(tiny_gpt().cuda(), cfg, total_steps=10)
    opt = _train(sm, 8, autocast)
    assert sm.mst.step_count == 8 and sm.mst.last_update["step"] == 8 and not sm.mst.last_update["gradient_fallback"]
    assert set(sm.mst.attention_patterns().values()) == {"sparse"}
    for name, p in sm.mst.parameters().items():
        mask = sm.mst.masks()[name]
        assert p.is_cuda and mask.is_cuda and p.dtype == torch.float32
        assert torch.count_nonzero(p[~mask]) == 0
        for v in opt.state[p].values():
            if v.dim():
                assert v.is_cuda and torch.count_nonzero(v[~mask]) == 0
    assert sm.mst.density() == pytest.approx(0.2, abs=0.01)


def test_compiled_step_on_cuda_does_not_recompile_at_updates():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.8, stride=4)
    sm = mst_compile.sparsify(tiny_gpt().cuda(), cfg, total_steps=12)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sm)
    x = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    graphs = []
    for _ in range(12):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[3], f"graphs compiled per step: {graphs}"  # 4 updates after step 4, none recompiled


@pytest.mark.torchrun
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over nccl needs two GPUs")
def test_torchrun_two_gpus_nccl_identical_masks(tmp_path):
    f = write(tmp_path, "tiny.py", TINY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mst_compile", "train", str(f), "--steps", "12", "--update-interval", "2", "--out", str(tmp_path / "ddp"), "--quiet", "--device", "cuda"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ranks_identical"] == {"masks": True, "weights": True}
