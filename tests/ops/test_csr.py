"""The CSR kernels against the masked-dense op (the oracle): same outputs, same gradients, same training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from mst_compile.ops import csr
from mst_compile.ops.crossovers import csr_crossover
from mst_compile.ops.csr import CsrStructure, choose_linear_kernel
from mst_compile.ops.sparse_linear import SparseWeight

TOL = dict(rtol=1e-4, atol=1e-5)


def _site(out_f, in_f, density, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    w = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.3)
    b = torch.nn.Parameter(torch.randn(out_f, generator=g))
    mask = torch.rand(shape, generator=g) < density
    sw = SparseWeight("w", w)
    sw.set_mask(mask)
    with torch.no_grad():
        w.mul_(mask)
    return sw, w, b, mask


def _run(sw, kernel, x, w, b, gy, transposed, probe):
    """One forward+backward on ``kernel``; returns output and every gradient."""
    sw.kernel = kernel
    sw.collect_dense_grad(probe)
    x = x.detach().clone().requires_grad_(True)
    w.grad = None
    if b is not None:
        b.grad = None
    y = sw(x, w, b, transposed)
    y.backward(gy)
    return dict(y=y.detach(), x=x.grad, w=w.grad, b=None if b is None else b.grad,
                probe=sw.dense_grad() if probe else None)


@pytest.mark.parametrize("density", [0.5, 0.2, 0.05])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("probe", [False, True])
def test_csr_matches_masked_dense(density, transposed, probe):
    g = torch.Generator().manual_seed(1)
    for out_f, in_f, lead, bias in [(48, 80, (13,), True), (80, 48, (2, 7), False), (64, 64, (3, 5), True)]:
        sw, w, b, mask = _site(out_f, in_f, density, transposed)
        b = b if bias else None
        x = torch.randn(*lead, in_f, generator=g)
        gy = torch.randn(*lead, out_f, generator=g)
        ref = _run(sw, "dense", x, w, b, gy, transposed, probe)
        got = _run(sw, "csr", x, w, b, gy, transposed, probe)
        assert sw._csr, "the CSR path did not run"
        assert got["y"].shape == ref["y"].shape and got["y"].is_contiguous()
        for k, v in ref.items():
            if v is None:
                assert got[k] is None, k
                continue
            assert got[k].shape == v.shape, k
            torch.testing.assert_close(got[k], v, **TOL, msg=f"{k} differs ({out_f}x{in_f}, lead {lead})")
        assert not got["w"][~mask].any(), "inactive weights got a gradient"
        if probe:  # the dense gradient really is dense: nonzero off the mask too
            assert got["probe"][~mask].abs().sum() > 0


@pytest.mark.parametrize("probe", [False, True])
def test_token_chunks_match_masked_dense(monkeypatch, probe):
    """Large inputs run in token chunks (uneven last chunk here); results must not change."""
    monkeypatch.setattr(csr, "_MIN_CHUNK", 8)
    monkeypatch.setattr(csr, "_CHUNK_FLOATS", 80 * 10)  # 10 tokens per chunk for a 48x80 weight
    g = torch.Generator().manual_seed(2)
    for transposed in (False, True):
        sw, w, b, _ = _site(48, 80, 0.2, transposed)
        x, gy = torch.randn(3, 9, 80, generator=g), torch.randn(3, 9, 48, generator=g)  # 27 tokens
        ref = _run(sw, "dense", x, w, b, gy, transposed, probe)
        got = _run(sw, "csr", x, w, b, gy, transposed, probe)
        for k, v in ref.items():
            if v is not None:
                torch.testing.assert_close(got[k], v, **TOL, msg=f"{k} differs")


def _dense_products(fn) -> int:
    """How many dense matrix products (mm/addmm/bmm) ``fn`` runs."""
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


def test_dense_gradient_only_when_probe_asks():
    sw, w, b, _ = _site(64, 96, 0.1)
    sw.kernel = "csr"
    x = torch.randn(32, 96, requires_grad=True)
    assert _dense_products(lambda: sw(x, w, b).sum().backward()) == 0
    sw.collect_dense_grad(True)
    assert _dense_products(lambda: sw(x, w, b).sum().backward()) == 1
    torch.testing.assert_close(sw.dense_grad(), torch.ones(32, 64).t() @ x.detach(), **TOL)


def test_gradients_for_partial_requirements():
    """First layer (input without grad) and frozen weight: only the asked gradients are formed."""
    sw, w, b, mask = _site(40, 24, 0.2)
    x = torch.randn(6, 24)
    for kernel in ("dense", "csr"):
        sw.kernel = kernel
        w.grad = None
        sw(x, w, b).square().sum().backward()
        if kernel == "dense":
            ref = w.grad.clone()
    torch.testing.assert_close(w.grad, ref, **TOL)
    w.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    sw(xg, w, None).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(6, 40) @ (w * mask), **TOL)


def test_mask_change_rebuilds_structure_and_values_follow_weight():
    sw, w, b, _ = _site(32, 48, 0.2)
    sw.kernel = "csr"
    x = torch.randn(5, 48)
    sw(x, w, b)
    st = sw._csr[False]
    sw(x, w, b)
    assert sw._csr[False] is st, "structure rebuilt although the mask did not change"

    new = torch.rand(32, 48, generator=torch.Generator().manual_seed(7)) < 0.05
    sw.set_mask(new)
    with torch.no_grad():
        w.mul_(new)
        w.add_(new * 0.5)  # an optimizer step: values change, structure does not
    y = sw(x, w, b)
    assert sw._csr[False] is not st and sw._csr[False].nnz == int(new.sum())
    torch.testing.assert_close(y, F.linear(x, w * new, b), **TOL)

    st = sw._csr[False]
    sw.mask.zero_()  # an in-place edit that bypasses set_mask is still noticed
    with torch.no_grad():
        w.zero_()
    assert sw(x, w, b).sub(b).abs().max() == 0
    assert sw._csr[False] is not st and sw._csr[False].nnz == 0


def test_structure_indices():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)  # (out=4, in=3)
    w = torch.arange(12.0).view(4, 3)
    for transposed, stored, weight in [(False, mask, w), (True, mask.t().contiguous(), w.t().contiguous())]:
        st = CsrStructure(stored, transposed)
        assert st.shape == (4, 3) and st.nnz == 5
        assert st.crow.tolist() == [0, 2, 2, 4, 5] and st.col.tolist() == [0, 2, 1, 2, 0]
        vals = st.values(weight)
        assert vals.tolist() == [0.0, 2.0, 7.0, 8.0, 9.0]
        torch.testing.assert_close(st.weight_csr(vals).to_dense(), w * mask)
        torch.testing.assert_close(st.weight_t_csr(vals).to_dense(), (w * mask).t())


def test_choose_linear_kernel_and_select_kernel():
    lo, hi = csr_crossover() / 2, min(1.0, csr_crossover() * 1.5)
    assert choose_linear_kernel(lo, "cpu", (768, 768)) == "csr"
    assert choose_linear_kernel(hi, "cpu", (768, 768)) == "dense"
    assert choose_linear_kernel(lo, "meta", (768, 768)) == "dense"  # not CPU: the masked-dense path
    assert choose_linear_kernel(lo, "cpu", (768, 16)) == "dense"  # too small to pay off
    assert choose_linear_kernel(hi, "cpu", (768, 768), "csr") == "csr"
    assert choose_linear_kernel(lo, "cpu", (768, 768), "dense") == "dense"
    with pytest.raises(ValueError, match="sparse_kernel='fast'.*auto, dense, csr"):
        choose_linear_kernel(lo, "cpu", None, "fast")
    with pytest.raises(ValueError, match="density=1.5"):
        choose_linear_kernel(1.5, "cpu")

    sw, *_ = _site(128, 128, 0.05)
    assert sw.select_kernel("auto") == "csr" and sw.kernel == "csr"
    sw.set_mask(torch.ones(128, 128, dtype=torch.bool))
    assert sw.select_kernel("auto") == "dense" and sw.kernel == "dense"
    assert sw.select_kernel("csr") == "csr"


def test_unsupported_inputs_fall_back_to_masked_dense():
    sw, w, b, mask = _site(32, 48, 0.2)
    sw.kernel = "csr"
    xb, wb = torch.randn(4, 48).bfloat16(), w.detach().bfloat16()  # no bf16 CSR kernels on CPU
    y = sw(xb, wb, None)
    assert not sw._csr and y.dtype == torch.bfloat16
    assert sw(torch.randn(0, 48), w, b).shape == (0, 32)


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(32, 96), torch.nn.Linear(96, 96), torch.nn.Linear(96, 10)
        self.sites = torch.nn.ModuleList(SparseWeight(f"fc{i}", fc.weight) for i, fc in enumerate(self.fcs(), 1))

    def fcs(self):
        return (self.fc1, self.fc2, self.fc3)

    def forward(self, x):
        for i, (fc, sw) in enumerate(zip(self.fcs(), self.sites)):
            x = sw(x, fc.weight, fc.bias)
            x = torch.relu(x) if i < 2 else x
        return x


def _train(kernel: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = _MLP()
    g = torch.Generator().manual_seed(3)
    for fc, sw in zip(model.fcs(), model.sites):
        mask = torch.rand(fc.weight.shape, generator=g) < 0.15
        sw.set_mask(mask)
        with torch.no_grad():
            fc.weight.mul_(mask)
        sw.kernel = kernel
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    x = torch.randn(8, 16, 32, generator=g)
    target = torch.randint(0, 10, (8, 16), generator=g)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x).view(-1, 10), target.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for fc, sw in zip(model.fcs(), model.sites):  # sparsity survives training on both paths
        assert not fc.weight[~sw.mask].any()
    return losses


def test_training_loss_curve_matches():
    dense, csr = _train("dense", 200), _train("csr", 200)
    assert dense[-1] < 0.5 * dense[0], "the reference did not learn; the comparison would be vacuous"
    torch.testing.assert_close(torch.tensor(csr), torch.tensor(dense), rtol=1e-3, atol=1e-4)
