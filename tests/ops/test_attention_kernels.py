"""Hybrid sparse attention kernels against the dense boolean-mask oracle (docs/design.md §5)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import LargestTensor as _Largest

from mst_compile.ops import attention_cpu
from mst_compile.ops import attention_kernels as K
from mst_compile.ops.attention import (
    PATTERNS,
    HybridSparseAttention,
    hsa_attention,
    mean_attended_keys,
    pattern_mask,
)

# (T, l, Hq, Hkv): divisible and not, GQA, l = 1, l = T, l > T/2, tiny T
CASES = [(64, 8, 4, 4), (37, 5, 4, 2), (50, 7, 3, 1), (33, 33, 2, 2), (20, 1, 2, 1), (130, 16, 2, 2), (9, 6, 1, 1), (1, 1, 2, 1),
         (100, 2, 2, 1)]  # the last: T/l > HYBRID_ABOVE, so "auto" runs the fused band + flash residues


def _qkv(T, Hq, Hkv, D=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v, torch.randn(B, Hq, T, D, generator=g)


def _oracle(q, k, v, g, T, l, pattern, scale=None):
    """fp64 dense attention under the boolean pattern mask, with its q/k/v gradients."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=pattern_mask(T, l, pattern), scale=scale
    )
    return (out, *torch.autograd.grad(out, (q, k, v), g.double()))


def _assert_close(got, want, what):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item()
    ref = max(want.abs().max().item(), 1.0)  # gradients that are exactly 0 (l = 1, T = 1) compare absolutely
    assert err <= 1e-5 * ref, f"{what}: max error {err:.3g} vs scale {ref:.3g}"


def _run(fn, q, k, v, g):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _impl(name, pattern, l, scale=None):
    """One way to compute a pattern: the public entry point or one of the three kernels directly."""
    local, strided = pattern != "strided", pattern != "local"
    if name == "auto":
        return lambda q, k, v: hsa_attention(q, k, v, pattern=pattern, stride=l, scale=scale)
    s = 1 / math.sqrt(16) if scale is None else scale
    if name == "fused":  # the C++ kernel, built on first use
        if not attention_cpu.available():
            pytest.skip("the fused CPU kernel cannot be built here (no C++ compiler / ninja)")
        return lambda q, k, v: attention_cpu.HSAFusedCPU.apply(q, k, v, l, local, strided, s)
    kernel = K._HSAFlash.apply if name == "flash" else K._hsa_explicit
    return lambda q, k, v: kernel(q, k, v, K._Plan.make(q.shape[2], l, local, strided), s)


IMPLS = ["auto", "fused", "flash", "matmul"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,l,Hq,Hkv", CASES)
@pytest.mark.parametrize("pattern", ["local", "strided", "sparse"])
def test_matches_oracle_forward_and_backward(T, l, Hq, Hkv, pattern, impl):
    q, k, v, g = _qkv(T, Hq, Hkv)
    want = _oracle(q, k, v, g, T, l, pattern)
    got = _run(_impl(impl, pattern, l), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        _assert_close(a, b, f"{impl} {pattern} T={T} l={l} {name}")


@pytest.mark.parametrize("T,l,Hq,Hkv", CASES)
def test_dense_matches_oracle(T, l, Hq, Hkv):
    q, k, v, g = _qkv(T, Hq, Hkv)
    got = _run(_impl("auto", "dense", l), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _oracle(q, k, v, g, T, l, "dense")):
        _assert_close(a, b, f"dense T={T} {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_scale_and_strided_input_layout(impl):
    """A (B, T, H, D) tensor transposed to (B, H, T, D) (nanoGPT's layout) and a custom scale."""
    B, T, H = 2, 45, 4
    q, k, v, g = (torch.randn(B, T, H, 16).transpose(1, 2) for _ in range(4))
    want = _oracle(q, k, v, g, T, 6, "sparse", scale=0.7)
    got = _run(_impl(impl, "sparse", 6, scale=0.7), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, b, f"{impl} layout {name}")


def test_dense_is_causal_sdpa():
    q, k, v, _ = _qkv(40, 4, 2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(hsa_attention(q, k, v, pattern="dense", stride=None), want, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100, 1000, 1023])
@pytest.mark.parametrize("l", [1, 3, 8, 31, 64, 128, 2000])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mean_attended_keys_counts_the_oracle(T, l, pattern):
    want = pattern_mask(T, l, pattern).sum().item() / T
    assert mean_attended_keys(pattern, T, l) == pytest.approx(want, rel=1e-12)


def test_mean_attended_keys_defaults_and_errors():
    assert mean_attended_keys("dense", 1024, None) == 512.5
    assert mean_attended_keys("sparse", 1024, None) == mean_attended_keys("sparse", 1024, 128)
    with pytest.raises(ValueError, match="'bogus'"):
        mean_attended_keys("bogus", 16, 4)
    with pytest.raises(ValueError, match="stride=0"):
        mean_attended_keys("local", 16, 0)


@pytest.mark.parametrize("pattern", ["local", "strided", "sparse"])
def test_never_builds_a_txt_matrix(pattern):
    """Forward and backward: no op output comes near even ONE T×T matrix (B·H = 4 of them)."""
    B, H, T, D, l = 2, 2, 512, 16, 16
    q, k, v, g = _qkv(T, H, H, D=D, B=B)
    q.requires_grad_()
    with _Largest() as seen:
        hsa_attention(q, k, v, pattern=pattern, stride=l).backward(g)
    assert seen.numel * 4 <= T * T, f"{pattern}: an op produced {seen.numel} elements"
    with _Largest() as dense:
        F.scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(T, l, pattern)).backward(g)
    assert dense.numel >= T * T  # the check above does see a T×T matrix when there is one


@pytest.mark.parametrize("T,l", [(20, 21), (20, 64), (5, 1000), (1, 2)])
@pytest.mark.parametrize("pattern", ["local", "strided", "sparse"])
def test_stride_longer_than_the_sequence_matches_oracle(T, l, pattern):
    """l > T (short sequences at an explicit stride): local and sparse are dense causal, strided is j == i."""
    q, k, v, g = _qkv(T, 4, 2)
    want = _oracle(q, k, v, g, T, l, pattern)
    causal = _oracle(q, k, v, g, T, T, "dense")
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), _run(_impl("auto", pattern, l), q, k, v, g), want, causal):
        _assert_close(a, b, f"{pattern} T={T} l={l} {name}")
        if pattern != "strided":
            _assert_close(a, c, f"{pattern} T={T} l={l} is dense causal ({name})")
    m = HybridSparseAttention("h.0.attn", pattern=pattern, stride=l)
    _assert_close(m(q, k, v), want[0], f"module {pattern} T={T} l={l}")
    assert mean_attended_keys(pattern, T, l) == pytest.approx(pattern_mask(T, l, pattern).sum().item() / T, rel=1e-12)


@pytest.mark.parametrize("bad,msg", [(0, "stride=0"), (-3, "stride=-3"), (2.5, "stride=2.5")])
def test_bad_stride(bad, msg):
    q, k, v, _ = _qkv(64, 2, 2)
    with pytest.raises(ValueError, match=msg):
        hsa_attention(q, k, v, pattern="sparse", stride=bad)


def test_bad_pattern_and_shapes():
    q, k, v, _ = _qkv(16, 3, 3)
    with pytest.raises(ValueError, match="'banded'"):
        hsa_attention(q, k, v, pattern="banded", stride=4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        hsa_attention(q, torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16), pattern="local", stride=4)


def test_module_switches_at_run_time_and_back():
    m = HybridSparseAttention("h.0.attn")
    q, k, v, _ = _qkv(48, 4, 2)
    dense = m(q, k, v)
    m.set_pattern("sparse", stride=4)
    sparse = m(q, k, v)
    assert not torch.allclose(dense, sparse, atol=1e-3)
    _assert_close(sparse, _oracle(q, k, v, torch.zeros_like(q), 48, 4, "sparse")[0], "module sparse")
    m.set_pattern("local")  # the stride is kept
    assert m.stride == 4
    _assert_close(m(q, k, v), _oracle(q, k, v, torch.zeros_like(q), 48, 4, "local")[0], "module local")
    m.set_pattern("dense")
    assert torch.equal(m(q, k, v), dense)


def test_module_default_stride_is_t_over_8():
    m = HybridSparseAttention("s", pattern="strided", stride=None)
    q, k, v, _ = _qkv(80, 2, 2)
    _assert_close(m(q, k, v), _oracle(q, k, v, torch.zeros_like(q), 80, 10, "strided")[0], "T/8")


def test_module_errors_name_the_site():
    m = HybridSparseAttention("transformer.h.3.attn")
    with pytest.raises(ValueError, match=r"transformer\.h\.3\.attn.*'diagonal'"):
        m.set_pattern("diagonal")
    with pytest.raises(ValueError, match=r"transformer\.h\.3\.attn.*stride=0"):
        m.set_pattern("sparse", stride=0)
    with pytest.raises(ValueError, match=r"transformer\.h\.3\.attn.*stride=-2"):
        m.set_pattern("local", stride=-2)


def test_module_padding_mask_applies_pattern_and_mask():
    """A runtime mask that removes causal keys: pattern AND mask, exactly (with one warning)."""
    T, l = 24, 4
    q, k, v, _ = _qkv(T, 2, 2)
    pad = torch.ones(2, 1, 1, T, dtype=torch.bool)
    pad[0, ..., :5] = False  # left padding in the first sequence
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    m = HybridSparseAttention("s", pattern="sparse", stride=l)
    with pytest.warns(UserWarning, match="masked dense"):
        got = m(q, k, v, attn_mask=pad & causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=pad & pattern_mask(T, l, "sparse"))
    torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-6)
    rows = slice(5, None)  # rows 0..4 of sequence 0 see no key at all (NaN on both sides)
    torch.testing.assert_close(got[0, :, rows], want[0, :, rows], rtol=1e-5, atol=1e-6)
    # a mask that keeps every causal key takes the fast path and matches the oracle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = m(q, k, v, attn_mask=causal)
    _assert_close(fast, _oracle(q, k, v, torch.zeros_like(q), T, l, "sparse")[0], "mask fast path")


def test_float64_and_scale_none_default():
    q, k, v, g = (t.double() for t in _qkv(30, 2, 2))
    got = hsa_attention(q, k, v, pattern="sparse", stride=4)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern_mask(30, 4, "sparse"), scale=1 / math.sqrt(16))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T,l,Hq,Hkv", [(37, 2, 4, 2), (64, 3, 2, 2), (100, 4, 2, 1), (50, 25, 2, 2), (130, 1, 2, 2)])
def test_hybrid_band_fused_residues_flash_matches_oracle(T, l, Hq, Hkv):
    """Many residue keys per row: fused band + flash residues, merged by lse."""
    if not attention_cpu.available():
        pytest.skip("the fused CPU kernel cannot be built here")
    q, k, v, g = _qkv(T, Hq, Hkv)
    want = _oracle(q, k, v, g, T, l, "sparse")
    got = _run(lambda q, k, v: K._HSAHybrid.apply(q, k, v, l, 0.25), q, k, v, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, b, f"hybrid T={T} l={l} {name}")


def test_kernel_choice():
    q, k, v, _ = _qkv(100, 2, 1)
    fused = attention_cpu.available()
    assert K.choose_attention_kernel(q, k, v, local=True, strided=True, stride=2) == ("fused+flash" if fused else "flash")
    assert K.choose_attention_kernel(q, k, v, local=True, strided=True, stride=16) == ("fused" if fused else "flash")
    assert K.choose_attention_kernel(q, k, v, local=False, strided=True, stride=16) == "flash"
    assert K.choose_attention_kernel(q.double(), k.double(), v.double(), local=True, strided=True, stride=16) == "flash"
