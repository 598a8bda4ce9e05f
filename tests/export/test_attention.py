"""export/attention.py (export against the oracle at the sites' lengths is in tests/export/test_finalize.py):
the blocked attention against softmax over the pattern's keys at lengths that are no multiple of the
stride and with values wider than the keys, the opaque op equal to the torch code, and GQA heads repeated."""
import math

import pytest
import torch

from mst_compile.export.attention import as_op, export_attention, hsa_op, pattern_attention


def _oracle(q, k, v, pattern, l, scale):
    T = q.shape[-2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    local, strided = i - j < l, (i - j) % l == 0
    keep = (j <= i) & {"dense": torch.ones(T, T, dtype=torch.bool), "local": local, "strided": strided,
                       "sparse": local | strided}[pattern]
    return ((q @ k.transpose(-1, -2)) * scale).masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "sparse"])
@pytest.mark.parametrize("T,l", [(11, 3), (7, 7), (5, 9), (24, None)])
def test_blocked_attention_is_the_pattern(pattern, T, l):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, T, 6, generator=g, dtype=torch.float64)  # Dv != D
    got = pattern_attention(q, k, v, pattern=pattern, stride=l, scale=0.7)
    stride = l if l is not None else max(1, T // 8)
    torch.testing.assert_close(got, _oracle(q, k, v, pattern, stride, 0.7))


def test_the_op_and_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 10, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(hsa_op(q[:, :2], k, v, "sparse", 0, 0.5),
                               pattern_attention(q[:, :2], k, v, pattern="sparse", stride=None, scale=0.5))
    plain = export_attention(q, k, v, pattern="local", stride=3)
    with as_op():
        opaque = export_attention(q, k, v, pattern="local", stride=3)
    torch.testing.assert_close(opaque, plain)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # query heads 2h, 2h+1 read kv head h
    torch.testing.assert_close(plain, _oracle(q, kk, vv, "local", 3, 1 / math.sqrt(4)))
