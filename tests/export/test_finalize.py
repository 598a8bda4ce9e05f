"""finalize(sm): masks folded into weights, plain ops back, outputs unchanged; the exportable
attention against the dense-mask oracle and the runtime's HSA op."""
import copy
import math

import pytest
import torch
from _models import hf_gpt2, hf_llama, tiny_gpt

import mst_compile
from mst_compile.export.attention import export_attention, pattern_attention
from mst_compile.ops.attention import hsa_attention, pattern_mask

PATTERNS = ("dense", "local", "strided", "sparse")


def _ids(b=2, t=16, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _build(case):
    torch.manual_seed(0)
    model = {"tiny_gpt": tiny_gpt, "hf_gpt2": hf_gpt2, "hf_llama": hf_llama}[case]()
    kw = case != "tiny_gpt"
    x = _ids()
    sm = mst_compile.sparsify(model, example_inputs={"input_ids": x} if kw else (x,))

    def run(mod, inputs):
        out = mod(input_ids=inputs) if kw else mod(inputs)
        return out.logits if hasattr(out, "logits") else out

    return model, sm, run


def _mst_nodes(gm):
    return [n for n in gm.graph.nodes if (n.op == "call_module" and n.target.startswith(("mst_sites.", "mst_attn.")))
            or (n.op == "call_function" and str(n.target).startswith("mst."))]


@pytest.mark.parametrize("case", ["tiny_gpt", "hf_gpt2", "hf_llama"])
def test_finalize_matches_sm_and_masked_reference(case):
    model, sm, run = _build(case)
    assert _mst_nodes(sm), "the sparsified module must have mst sites to remove"
    sm.mst.set_sparsity(0.9)
    ref = copy.deepcopy(model)  # dense copy with the masks multiplied in by hand: the oracle
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in sm.mst.masks():
                p.mul_(sm.mst.masks()[name])
    fm = mst_compile.finalize(sm)
    assert _mst_nodes(fm) == []
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__ in ("SparseWeight", "HybridSparseAttention")
                   for m in fm.modules())
    x = _ids(3, 11, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(run(fm, x), run(ref.eval(), x))
        torch.testing.assert_close(run(fm, x), run(sm, x))
    # finalize shares the parameters: the user's model keeps the sparse weights
    params = dict(model.named_parameters())
    fparams = dict(fm.named_parameters())
    for name, mask in sm.mst.masks().items():
        assert torch.all(params[name][~mask] == 0)
        assert any(p is params[name] for p in fparams.values())


def test_finalize_folds_masks_and_leaves_sm_trainable():
    model, sm, run = _build("tiny_gpt")
    sm.mst.set_sparsity(0.8)
    name, mask = next(iter(sm.mst.masks().items()))
    with torch.no_grad():  # break the invariant on purpose: finalize must still fold the mask
        dict(model.named_parameters())[name][~mask] = 1.0
    fm = mst_compile.finalize(sm)
    assert torch.all(dict(fm.named_parameters())[name][~mask] == 0)
    loss = run(sm, _ids()).square().mean()  # sm still trains after a finalize
    loss.backward()
    assert _mst_nodes(sm) and dict(model.named_parameters())[name].grad is not None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_finalize_attention_override_equals_hsa(pattern):
    model, sm, run = _build("tiny_gpt")
    sm.mst.set_sparsity(0.5)
    sites = list(sm.mst.attention_modules())
    assert len(sites) == 2 and set(sm.mst.attention_patterns().values()) == {"dense"}
    fm = mst_compile.finalize(sm, attention=pattern)
    sm.mst.set_attention(pattern, stride=3)
    fm3 = mst_compile.finalize(sm)  # default: the patterns (and stride) active now
    x = _ids(2, 13)
    with torch.no_grad():
        y3 = run(sm, x)
        torch.testing.assert_close(run(fm3, x), y3)
        for site in sm.mst.attention_modules().values():
            site.set_pattern(pattern, stride=None)  # T/8, as when fm was finalized
        torch.testing.assert_close(run(fm, x), run(sm, x))
    if pattern != "dense":
        assert not torch.allclose(run(fm, x), run(mst_compile.finalize(sm, attention="dense"), x))


@pytest.mark.parametrize("T, stride", [(1, None), (1, 1), (5, None), (5, 4), (16, None), (16, 1), (23, None), (23, 4)])
def test_export_attention_equals_mask_oracle_and_runtime_op(T, stride):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, T, 8, generator=g, dtype=torch.float64) for _ in range(2))  # grouped-query: 2 kv heads
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for pattern in PATTERNS:
        allowed = pattern_mask(T, stride, pattern)
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
        oracle = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv  # (B, H, T, D)
        got = export_attention(q, k, v, None, None, True, pattern=pattern, stride=stride)
        torch.testing.assert_close(got, oracle, atol=1e-10, rtol=0, msg=f"{pattern} T={T} stride={stride}")
        torch.testing.assert_close(got, hsa_attention(q, k, v, pattern=pattern, stride=stride), atol=1e-6, rtol=0)
    # (B·H, T, D) inputs of a bmm spelling and an explicit scale
    got = export_attention(q[0], kk[0], vv[0], None, 0.3, False, pattern="sparse", stride=stride)
    torch.testing.assert_close(got, pattern_attention(q[:1], kk[:1], vv[:1], pattern="sparse", stride=stride, scale=0.3)[0])


def test_finalize_bad_input():
    with pytest.raises(TypeError, match="mst_compile.sparsify"):
        mst_compile.finalize(tiny_gpt())
    _, sm, _ = _build("tiny_gpt")
    with pytest.raises(ValueError, match="attention\\['h.0.attn'\\]='bogus'"):
        mst_compile.finalize(sm, attention="bogus")
    with pytest.raises(ValueError, match="unknown attention sites \\['nope'\\]"):
        mst_compile.finalize(sm, attention={"nope": "sparse"})
    with pytest.raises(TypeError, match="attention must be"):
        mst_compile.finalize(sm, attention=3)


def test_finalize_of_an_exported_module_warns_nothing():
    """Copying a torch.export graph made torch 2.13 warn about its own LeafSpec, and `mstc export` showed it."""
    import warnings

    from mst_compile.export import finalize

    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(flash=False), example_inputs=(_ids(),))
    assert sm.mst.capture == "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = finalize(sm)
    torch.testing.assert_close(plain(_ids(3, 9)), sm(_ids(3, 9)))
