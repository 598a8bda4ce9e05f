"""integrations/hf_attention.py: the mst_hsa attention function against softmax over the pattern's keys,
layers without an entry on transformers' SDPA, a bad config.json entry and a static cache named in one line."""
import math

import pytest
import torch

pytest.importorskip("transformers")
from types import SimpleNamespace

from mst_compile.errors import MstCompileError
from mst_compile.integrations.hf_attention import CONFIG_KEY, NAME, attention_forward, mask_for, register


def _layer(idx, table):
    return SimpleNamespace(layer_idx=idx, config=SimpleNamespace(**{CONFIG_KEY: table}), is_causal=True, training=False)


def _qkv(T=10):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))


def _oracle(q, k, v, keep):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (s.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def test_a_layer_runs_its_pattern():
    q, k, v = _qkv()
    out, weights = attention_forward(_layer(1, {"1": {"pattern": "local", "stride": 3}}), q, k, v, None)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    keep = (j <= i) & (i - j < 3)
    assert weights is None and out.shape == (1, 10, 2, 4)
    torch.testing.assert_close(out, _oracle(q, k, v, keep))


def test_layers_without_an_entry_or_dense_run_causal_attention():
    q, k, v = _qkv()
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    for module in (_layer(0, {"1": {"pattern": "local", "stride": 3}}), _layer(1, {"1": {"pattern": "dense"}}), _layer(1, None)):
        out, _ = attention_forward(module, q, k, v, None)
        torch.testing.assert_close(out, _oracle(q, k, v, causal))


def test_a_bad_entry_and_a_static_cache_are_refused():
    q, k, v = _qkv()
    with pytest.raises(MstCompileError, match=r"config.json mst_attention\['2'\] = .* is invalid: expected"):
        attention_forward(_layer(2, {"2": {"pattern": "local", "stride": 0}}), q, k, v, None)
    with pytest.raises(MstCompileError, match=r"this cache holds 16 key slots for queries at 5..5 \(a static cache\)"):
        mask_for(1, 1, 16, q_offset=5, kv_offset=0)
    register()
    register()  # idempotent
    from transformers import AttentionInterface

    assert AttentionInterface()[NAME] is attention_forward
