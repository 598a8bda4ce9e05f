"""ops/sparse_linear.py: the mask-carrying op against autograd of F.linear on the masked weight (the
oracle): output, input, weight, bias and probe (dense) gradients; SparseWeight's masks, transposed
weights, the dense gradient of a tied weight, and the refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.ops.sparse_linear import SparseWeight, sparse_linear


def _case(seed=0, out=6, inp=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=g) < 0.5
    w = torch.randn(out, inp, generator=g) * mask
    return torch.randn(3, 4, inp, generator=g), w, mask, torch.randn(out, generator=g)


@pytest.mark.parametrize("probe_on", [False, True])
def test_op_matches_the_masked_dense_oracle(probe_on):
    x, w, mask, b = _case()
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
    probe = torch.zeros_like(w, requires_grad=True) if probe_on else torch.empty(0)
    gy = torch.randn(3, 4, 6)
    y = sparse_linear(x1, w1, mask, b1, probe)
    (y * gy).sum().backward()
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    ref = F.linear(x2, w2, b2)  # the oracle: the dense gradient, masked by hand below
    (ref * gy).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)
    torch.testing.assert_close(w1.grad, w2.grad * mask)  # inactive weights get no gradient
    if probe_on:
        torch.testing.assert_close(probe.grad, w2.grad)  # the dense gradient, inactive weights included


def test_sparse_weight_forward_plain_and_transposed():
    x, w, mask, b = _case(1)
    p = nn.Parameter(w.clone())
    sw = SparseWeight("w", p)
    assert sw.numel == 30 and sw.active() == 30  # starts dense
    sw.set_mask(mask)
    assert sw.active() == int(mask.sum()) and sw.units == 30
    torch.testing.assert_close(sw(x, p, b), F.linear(x, w, b))
    pt = nn.Parameter(w.t().contiguous())  # stored (in, out), as HF Conv1D
    swt = SparseWeight("wt", pt)
    swt.set_mask(mask.t())
    swt.collect_dense_grad(True)
    y = swt(x, pt, b, transposed=True)
    torch.testing.assert_close(y, x @ w.t() + b)
    y.square().sum().backward()
    xr, wr = x.clone(), w.t().clone().requires_grad_()
    (xr @ wr + b).square().sum().backward()
    torch.testing.assert_close(pt.grad, wr.grad * mask.t())
    torch.testing.assert_close(swt.dense_grad(), wr.grad)
    swt.collect_dense_grad(False)
    assert swt.dense_grad() is None


def test_a_tied_weight_gets_the_dense_gradient_of_every_use():
    g = torch.Generator().manual_seed(2)
    emb = nn.Parameter(torch.randn(7, 4, generator=g))
    mask = torch.rand(7, 4, generator=g) < 0.5
    with torch.no_grad():
        emb.mul_(mask)
    sw = SparseWeight("head", emb)
    sw.set_mask(mask)
    sw.collect_dense_grad(True)
    hook = emb.register_hook(sw.mask_gradient)
    idx = torch.tensor([[1, 3, 6]])
    sw(F.embedding(idx, emb), emb).logsumexp(-1).sum().backward()  # lookup and head read the same tensor
    hook.remove()
    ref = emb.detach().clone().requires_grad_()
    F.linear(F.embedding(idx, ref), ref).logsumexp(-1).sum().backward()
    torch.testing.assert_close(emb.grad, ref.grad * mask)
    torch.testing.assert_close(sw.dense_grad(), ref.grad)


def test_masks_that_do_not_fit_are_refused():
    sw = SparseWeight("fc.weight", nn.Parameter(torch.ones(4, 4)))
    with pytest.raises(ValueError, match=r"mask for fc.weight has shape \(4, 3\), expected \(4, 4\)"):
        sw.set_mask(torch.ones(4, 3, dtype=torch.bool))
    sw.use_tiles(2)
    ragged = torch.ones(4, 4, dtype=torch.bool)
    ragged[0, 0] = False
    with pytest.raises(ValueError, match="not constant on 2x2 tiles"):
        sw.set_mask(ragged)
    assert sw.units == 4 and sw.active_units() == 4
