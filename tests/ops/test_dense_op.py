"""ops/dense_op.py: DenseOp runs the op unchanged, and its forward FLOPs match torch's FlopCounterMode (and
the causal convention (T + 1)/2 keys per query for is_causal attention)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mst_compile.ops.dense_op import DenseOp

g = torch.Generator().manual_seed(0)
A, B = torch.randn(2, 3, 5, generator=g), torch.randn(2, 5, 4, generator=g)
X, W, BIAS = torch.randn(6, 5, generator=g), torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
M1, M2, C = torch.randn(6, 5, generator=g), torch.randn(5, 7, generator=g), torch.randn(6, 7, generator=g)

CASES = [
    ("matmul", torch.matmul, (A, B), {}),
    ("matmul", torch.bmm, (A, B), {}),
    ("linear", F.linear, (X, W, BIAS), {}),
    ("addmm", torch.addmm, (C, M1, M2), {}),
    ("einsum", torch.einsum, ("bij,bjk->bik", A, B), {}),
    ("einsum", torch.einsum, ("bij,bjk->bik", [A, B]), {}),
    ("einsum", torch.einsum, ("...ij,...jk", A, B), {}),
]


def _counted(fn, args, kwargs):
    with FlopCounterMode(display=False) as fc:
        out = fn(*args, **kwargs)
    return out, fc.get_total_flops()


@pytest.mark.parametrize("kind,fn,args,kwargs", CASES)
def test_forward_flops_match_the_flop_counter(kind, fn, args, kwargs):
    op = DenseOp("site", kind, fn)
    out, ref = _counted(fn, args, kwargs)
    torch.testing.assert_close(op(*args, **kwargs), out, rtol=0, atol=0)
    assert op.forward_flops(args, kwargs, out) == pytest.approx(ref)


def test_attention_flops_full_and_causal():
    q, k, v = (torch.randn(2, 3, 8, 4, generator=g) for _ in range(3))
    op = DenseOp("attn", "sdpa", F.scaled_dot_product_attention)
    out = F.scaled_dot_product_attention(q, k, v)
    _, ref = _counted(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v, (q, k, v), {})  # its two matmuls
    assert op.forward_flops((q, k, v), {}, out) == pytest.approx(ref) == 2 * 2 * 3 * 8 * 8 * (4 + 4)
    causal = op.forward_flops((q, k, v), {"is_causal": True}, out)
    assert causal == pytest.approx(2 * 2 * 3 * 8 * (8 + 1) / 2 * (4 + 4))
    assert op.forward_flops((q, k, v, None, 0.0, True), {}, out) == causal  # is_causal given by position


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match=r"DenseOp 'x': kind 'conv' is not one of"):
        DenseOp("x", "conv", torch.matmul)
