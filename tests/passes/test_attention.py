"""The attention pass on nanoGPT-style, Hugging Face GPT-2 / LLaMA / BERT graphs (fx and ATen)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mst_compile.capture import capture
from mst_compile.ops.attention import HybridSparseAttention, pattern_mask
from mst_compile.passes.attention import rewrite_attention

# ----------------------------------------------------------------------------- a nanoGPT-style model


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention; ``spelling``: "flash" (SDPA is_causal), "manual" (masked softmax over the
    ``bias`` buffer), "traceable" (masked softmax with an inline mask, fx-traceable) or "oracle" (SDPA
    with ``pattern_mask``, the reference for a rewritten model)."""

    def __init__(self, n_embd, n_head, block_size, spelling):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.0)
        self.n_head, self.n_embd, self.spelling = n_head, n_embd, spelling
        self.oracle = ("dense", None)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.spelling == "flash":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        elif self.spelling == "oracle":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(T, self.oracle[1], self.oracle[0]))
        else:
            if self.spelling == "manual":  # nanoGPT's own lines (not fx-traceable: torch.export captures it)
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            else:  # scale as a graph value, mask from the scores' shape
                att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
                att = att.masked_fill(torch.ones_like(att, dtype=torch.bool).triu(1), float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, spelling):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, spelling)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, spelling="flash", vocab=64, n_embd=32, n_head=4, n_layer=2, block_size=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, block_size, spelling) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def use_oracle(self, pattern, stride):
        for block in self.h:
            block.attn.spelling, block.attn.oracle = "oracle", (pattern, stride)


def _gpt(spelling):
    torch.manual_seed(0)
    return GPT(spelling).eval()


IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


def _sites(gm):
    return [m for m in gm.modules() if isinstance(m, HybridSparseAttention)]


def _attention_ops(gm):
    names = ("softmax", "scaled_dot_product_attention")
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and any(s in str(n.target) for s in names)]


# ----------------------------------------------------------------------------- nanoGPT, both spellings


@pytest.mark.parametrize("spelling,how", [("flash", "fx"), ("manual", "export"), ("traceable", "fx")])
def test_nanogpt_every_layer_rewritten_and_exact(spelling, how):
    model = _gpt(spelling)
    want = model(IDS)
    gm, got_how = capture(model, (IDS,))
    assert got_how == how
    res = rewrite_attention(gm, example_inputs=(IDS,))
    assert [s.name for s in res.sites] == ["h.0.attn", "h.1.attn"] and res.skipped == []
    assert {s.kind for s in res.sites} == {"attention"}
    assert _attention_ops(gm) == []  # softmax / SDPA / mask nodes are gone
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and "mst_attn" in n.target]
    assert calls == ["mst_attn.attn_0", "mst_attn.attn_1"]
    torch.testing.assert_close(gm(IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["flash", "manual"])
@pytest.mark.parametrize("pattern,stride", [("sparse", 5), ("local", 8), ("strided", 3)])
def test_nanogpt_patterns_match_oracle_model(spelling, pattern, stride):
    model = _gpt(spelling)
    gm, _ = capture(model, (IDS,))
    res = rewrite_attention(gm, pattern=pattern, stride=stride, example_inputs=(IDS,))
    assert all(s.module.pattern == pattern for s in res.sites)
    got = gm(IDS)
    model.use_oracle(pattern, stride)
    torch.testing.assert_close(got, model(IDS), rtol=1e-5, atol=1e-5)


def test_switch_at_run_time_changes_and_restores_outputs():
    model = _gpt("flash")
    gm, _ = capture(model, (IDS,))
    res = rewrite_attention(gm)
    dense = gm(IDS)
    for s in res.sites:
        s.module.set_pattern("sparse", stride=4)
    sparse = gm(IDS)
    assert (sparse - dense).abs().max() > 1e-3
    res.sites[0].module.set_pattern("dense")  # per layer: layer 0 dense, layer 1 sparse
    mixed = gm(IDS)
    assert not torch.allclose(mixed, dense) and not torch.allclose(mixed, sparse)
    for s in res.sites:
        s.module.set_pattern("dense")
    assert torch.equal(gm(IDS), dense)


def test_training_step_through_rewritten_graph():
    model = _gpt("manual")
    gm, _ = capture(model, (IDS,))
    rewrite_attention(gm, pattern="sparse", stride=4, example_inputs=(IDS,))
    loss = F.cross_entropy(gm(IDS).flatten(0, 1), IDS.flatten())
    loss.backward()
    model.use_oracle("sparse", 4)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_export_without_example_inputs_uses_recorded_shapes():
    model = _gpt("manual")
    gm, _ = capture(model, (IDS,))
    res = rewrite_attention(gm)  # no example_inputs: placeholders' recorded shapes
    assert len(res.sites) == 2


def test_fx_mask_that_cannot_be_evaluated_is_reported():
    gm = torch.fx.symbolic_trace(_gpt("traceable"))
    res = rewrite_attention(gm, example_inputs=(torch.randn(3),))  # wrong inputs: mask evaluation fails
    assert res.sites == [] and len(res.skipped) == 2
    assert all("could not evaluate the attention mask" in why for _, why in res.skipped)


# ----------------------------------------------------------------------------- Hugging Face


def _hf(kind, impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "gpt2":
            cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, attn_implementation=impl,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            return transformers.GPT2LMHeadModel(cfg).eval()
        if kind == "llama":
            cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, vocab_size=256, attn_implementation=impl)
            return transformers.LlamaForCausalLM(cfg).eval()
        cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=256, attn_implementation=impl, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return transformers.BertModel(cfg).eval()


def _first(out):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.slow
@pytest.mark.parametrize("kind,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_hf_decoders_every_layer_rewritten(kind, impl):
    model = _hf(kind, impl)
    want = _first(model(IDS, use_cache=False))
    gm, how = capture(model, (IDS,))
    assert how == "export"
    res = rewrite_attention(gm, example_inputs=(IDS,))
    assert len(res.sites) == 2 and res.skipped == []
    assert _attention_ops(gm) == []
    torch.testing.assert_close(_first(gm(IDS)), want, rtol=1e-4, atol=1e-5)
    for s in res.sites:
        s.module.set_pattern("sparse", stride=3)
    assert (_first(gm(IDS)) - want).abs().max() > 1e-3
    for s in res.sites:
        s.module.set_pattern("dense")
    torch.testing.assert_close(_first(gm(IDS)), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_gpt2_padding_mask_is_kept(impl):
    model = _hf("gpt2", impl)
    am = torch.ones(2, 24, dtype=torch.long)
    gm, _ = capture(model, {"input_ids": IDS, "attention_mask": am})
    res = rewrite_attention(gm, example_inputs={"input_ids": IDS, "attention_mask": am})
    assert len(res.sites) == 2
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("mst_attn")]
    assert all(n.kwargs["attn_mask"] is not None for n in calls)  # depends on attention_mask: kept
    padded = am.clone()
    padded[1, -6:] = 0  # right padding in the second sequence
    want = _first(model(input_ids=IDS, attention_mask=padded, use_cache=False))
    got = _first(gm(input_ids=IDS, attention_mask=padded))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_encoder_sites_are_skipped(impl):
    model = _hf("bert", impl)
    want = _first(model(IDS))
    gm, _ = capture(model, (IDS,))
    res = rewrite_attention(gm, pattern="sparse", example_inputs=(IDS,))
    assert res.sites == [] and len(res.skipped) == 2
    assert all("non-causal" in why for _, why in res.skipped)
    assert [name for name, _ in res.skipped] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    torch.testing.assert_close(_first(gm(IDS)), want)


# ----------------------------------------------------------------------------- bad input


def test_bad_arguments_are_named():
    gm = torch.fx.symbolic_trace(_gpt("flash"))
    with pytest.raises(ValueError, match="'sparse2'"):
        rewrite_attention(gm, pattern="sparse2")
    with pytest.raises(ValueError, match="stride=0"):
        rewrite_attention(gm, pattern="sparse", stride=0)
    res = rewrite_attention(gm, pattern="sparse", stride=40)  # larger than T=24: the band covers all keys
    with pytest.raises(ValueError, match=r"h\.1\.attn.*'bogus'"):
        res.sites[1].module.set_pattern("bogus")


def test_non_causal_site_is_not_rewritten_even_when_sparse_is_asked():
    class Encoder(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    gm = torch.fx.symbolic_trace(Encoder())
    res = rewrite_attention(gm, pattern="sparse")
    assert res.sites == [] and "non-causal" in res.skipped[0][1]
    x = torch.randn(1, 2, 5, 4)
    torch.testing.assert_close(gm(x, x, x), F.scaled_dot_product_attention(x, x, x))  # still bidirectional


# ----------------------------------------------------------------------------- through sparsify / sm.mst


def test_sparsify_lists_attention_sites_and_switches_per_layer():
    from mst_compile.api import sparsify

    model = _gpt("flash")
    sm = sparsify(model)
    attention = [e.name for e in sm.mst.sites if e.kind == "attention"]
    assert attention == ["h.0.attn", "h.1.attn"]
    dense = sm(IDS)
    sm.mst.set_attention({"h.0.attn": "local", "h.1.attn": "sparse"}, stride=6)
    assert sm.mst.attention_patterns() == {"h.0.attn": "local", "h.1.attn": "sparse"}
    got = sm(IDS)
    model.h[0].attn.spelling, model.h[0].attn.oracle = "oracle", ("local", 6)
    model.h[1].attn.spelling, model.h[1].attn.oracle = "oracle", ("sparse", 6)
    torch.testing.assert_close(got, model(IDS), rtol=1e-5, atol=1e-5)
    sm.mst.set_attention(["dense", "dense"])
    torch.testing.assert_close(sm(IDS), dense, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'nope'"):
        sm.mst.set_attention("nope")


# ----------------------------------------------------------------------------- SDPA spellings


class _Sdpa(nn.Module):
    """SDPA with is_causal + GQA + custom scale, or an explicit causal bool / additive float mask."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v):
        T = q.size(-2)
        if self.mode == "gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        future = q.new_ones(T, T, dtype=torch.bool).triu(1)
        if self.mode == "bool":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~future, scale=0.3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=q.new_zeros(T, T).masked_fill(future, float("-inf")))


@pytest.mark.parametrize("mode", ["gqa", "bool", "float"])
@pytest.mark.parametrize("how", ["fx", "export"])
def test_sdpa_spellings(mode, how):
    g = torch.Generator().manual_seed(0)
    T, Hkv = 21, (2 if mode == "gqa" else 4)
    q, k, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, Hkv, T, 8, generator=g), torch.randn(2, Hkv, T, 8, generator=g)
    model = _Sdpa(mode)
    want = model(q, k, v)
    gm = torch.fx.symbolic_trace(model) if how == "fx" else torch.export.export(model, (q, k, v), strict=False).module()
    res = rewrite_attention(gm, example_inputs=(q, k, v))
    assert len(res.sites) == 1 and _attention_ops(gm) == []
    torch.testing.assert_close(gm(q, k, v), want, rtol=1e-5, atol=1e-6)
    res.sites[0].module.set_pattern("sparse", stride=4)
    scale = None if mode == "float" else 0.3
    oracle = F.scaled_dot_product_attention(q, k.repeat_interleave(4 // Hkv, 1), v.repeat_interleave(4 // Hkv, 1),
                                            attn_mask=pattern_mask(T, 4, "sparse"), scale=scale)
    torch.testing.assert_close(gm(q, k, v), oracle, rtol=1e-5, atol=1e-6)


def test_stride_longer_than_the_sequence_is_dense_causal_attention():
    gm = torch.fx.symbolic_trace(_gpt("flash"))
    dense = torch.fx.symbolic_trace(_gpt("flash"))
    dense.load_state_dict(gm.state_dict())
    rewrite_attention(gm, pattern="sparse", stride=40)  # T=24: the local band holds every earlier key
    torch.testing.assert_close(gm(IDS), dense(IDS))
