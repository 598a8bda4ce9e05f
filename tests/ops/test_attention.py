"""ops/attention.py, the pattern definitions and the cached path (the kernels and the module have
tests/ops/test_attention_kernels.py): pattern_mask against docs/design.md §5 written as loops, the
effective pattern of a widened stride, and hsa_attention_cached against softmax over the allowed keys:
a KV-cache decoding step, a padded batch, and a whole sequence."""
import math

import pytest
import torch

from mst_compile.ops.attention import (
    allowed_keys,
    effective_pattern,
    hsa_attention,
    hsa_attention_cached,
    pattern_mask,
    removes_causal_keys,
)


def _allowed(i, j, pattern, l):
    """docs/design.md §5 for query i and key j."""
    if j > i:
        return False
    local, strided = i - j < l, (i - j) % l == 0
    return {"dense": True, "local": local, "strided": strided, "sparse": local or strided}[pattern]


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "sparse"])
@pytest.mark.parametrize("T,l", [(9, 3), (8, 8), (5, 7), (16, None)])
def test_pattern_mask_is_the_definition(pattern, T, l):
    m = pattern_mask(T, l, pattern)
    stride = l or max(1, T // 8)
    ref = torch.tensor([[_allowed(i, j, pattern, stride) for j in range(T)] for i in range(T)])
    assert torch.equal(m, ref)


def test_effective_pattern():
    assert effective_pattern("sparse", 4, 1.0, 32) == ("sparse", 4)
    assert effective_pattern("sparse", None, 1.0, 64) == ("sparse", 8)  # T/8
    assert effective_pattern("local", 4, 2.5, 32) == ("local", 10)  # ceil(4 · 2.5)
    assert effective_pattern("local", 4, 8.0, 32) == ("dense", 32)  # a band over every earlier key
    assert effective_pattern("strided", 40, 1.0, 32) == ("strided", 32)
    assert effective_pattern("dense", 4, 1.0, 32) == ("dense", 32)


def _oracle(q, k, v, keep):
    """softmax over the allowed keys, by hand; q (B, H, Tq, D), keep broadcastable to (B, H, Tq, Tk)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("pattern", ["local", "strided", "sparse"])
def test_decoding_with_a_cache_matches_the_whole_sequence(pattern):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    whole = hsa_attention_cached(q, k, v, pattern=pattern, stride=3)
    keep = torch.tensor([[_allowed(i, j, pattern, 3) for j in range(12)] for i in range(12)])
    torch.testing.assert_close(whole, _oracle(q, k, v, keep))
    for t in (1, 5, 11):  # the query at position t, keys 0..t in the cache
        step = hsa_attention_cached(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pattern=pattern, stride=3)
        torch.testing.assert_close(step, whole[:, :, t:t + 1])
    last3 = hsa_attention_cached(q[:, :, 9:], k, v, pattern=pattern, stride=3)  # several new tokens
    torch.testing.assert_close(last3, whole[:, :, 9:])


def test_a_padded_batch_applies_pattern_and_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    pad[0, :, :, :3] = False  # the first sequence is left-padded by 3
    pad[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # padded queries see themselves (no empty rows)
    assert removes_causal_keys(pad, 8)
    keep = torch.tensor([[_allowed(i, j, "sparse", 2) for j in range(8)] for i in range(8)]) & pad
    got = hsa_attention_cached(q, k, v, pattern="sparse", stride=2, attn_mask=pad)
    torch.testing.assert_close(got, _oracle(q, k, v, keep))
    additive = torch.zeros(2, 1, 8, 8, dtype=torch.float64).masked_fill(~pad, torch.finfo(torch.float64).min)
    assert torch.equal(allowed_keys(additive), pad)
    torch.testing.assert_close(hsa_attention_cached(q, k, v, pattern="sparse", stride=2, attn_mask=additive), got)


def test_causal_masks_are_not_padding_and_queries_must_end_the_keys():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert not removes_causal_keys(causal, 6) and not removes_causal_keys(torch.ones(6, 6, dtype=torch.bool), 6)
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="4 queries but only 3 keys"):
        hsa_attention_cached(q, q[:, :, :3], q[:, :, :3], pattern="local", stride=2)
    with pytest.raises(ValueError, match="stride=0 is invalid"):  # the cached path takes pattern and stride as checked
        hsa_attention(q, q, q, pattern="local", stride=0)
