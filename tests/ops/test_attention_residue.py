"""The residue-class HSA kernel (the GPU path, device-agnostic) against the dense boolean-mask oracle."""
import pytest
import torch
import torch.nn.functional as F
from _models import LargestTensor as _Largest

from mst_compile.ops import attention_kernels as K
from mst_compile.ops.attention import hsa_attention, pattern_mask
from mst_compile.ops.attention_residue import backend_for, hsa_residue

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (T, l, Hq, Hkv): divisible and not, GQA, l = 1, l = T, l > T (one block), tiny T, T/l large
CASES = [(64, 8, 4, 4), (37, 5, 4, 2), (50, 7, 3, 1), (33, 33, 2, 2), (20, 1, 2, 1), (9, 6, 1, 1), (1, 1, 2, 1),
         (100, 2, 2, 1), (40, 50, 2, 2)]
PATTERNS = ["local", "strided", "sparse"]


def _qkv(T, Hq, Hkv, D=16, B=2, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda H: torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    return make(Hq), make(Hkv), make(Hkv), make(Hq)


def _oracle(q, k, v, g, l, pattern):
    """fp64 dense attention under the boolean pattern mask, with its q/k/v gradients."""
    T, rep = q.shape[2], q.shape[1] // k.shape[1]
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    mask = pattern_mask(T, l, pattern, q.device)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    return (out, *torch.autograd.grad(out, (q, k, v), g.double()))


def _run(q, k, v, g, pattern, l, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = hsa_residue(q, k, v, local=pattern != "strided", strided=pattern != "local", stride=l, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _check(got, want, rel, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        err = (a.double() - b).abs().max().item()
        ref = max(b.abs().max().item(), 1.0)
        assert err <= rel * ref, f"{what} {name}: max error {err:.3g} vs scale {ref:.3g}"


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("T,l,Hq,Hkv", CASES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_oracle_forward_and_backward(T, l, Hq, Hkv, pattern, backend):
    q, k, v, g = _qkv(T, Hq, Hkv)
    got = _run(q, k, v, g, pattern, l, backend=backend)
    assert got[0].dtype == torch.float32
    _check(got, _oracle(q, k, v, g, l, pattern), 1e-5, f"{backend} {pattern} T={T} l={l}")


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_gradcheck_float64(backend):
    """Finite differences: the merged backward (no gradient through lse) is the exact gradient."""
    q, k, v, _ = (t.double() for t in _qkv(11, 4, 2, D=4, B=1))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    f = lambda q, k, v: hsa_residue(q, k, v, local=True, strided=True, stride=3, backend=backend)
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_transposed_layout_and_custom_scale():
    """nanoGPT's (B, T, H, D) tensors transposed to (B, H, T, D), and an explicit scale."""
    q, k, v, g = (torch.randn(2, 48, 4, 16).transpose(1, 2) for _ in range(4))
    mask = pattern_mask(48, 6, "sparse")
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=0.7)
    want = (want, *torch.autograd.grad(want, (qd, kd, vd), g.double()))
    _check(_run(q, k, v, g, "sparse", 6, scale=0.7), want, 1e-5, "transposed")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bfloat16_within_tolerance(pattern):
    T, l = 90, 8
    q, k, v, g = _qkv(T, 4, 2, dtype=torch.bfloat16)
    got = _run(q, k, v, g, pattern, l)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    _check(got, _oracle(q, k, v, g, l, pattern), 3e-2, f"bf16 {pattern}")


def test_dispatch_selects_residue_off_cpu_and_on_request():
    meta = [torch.empty(1, 2, 64, 16, device="meta") for _ in range(3)]
    assert K.choose_attention_kernel(*meta, local=True, strided=True, stride=8) == "residue"
    q, k, v, _ = _qkv(48, 2, 2)
    forced = K.hsa_kernel(q, k, v, local=True, strided=True, stride=6, scale=None, kernel="residue")
    torch.testing.assert_close(forced, hsa_attention(q, k, v, pattern="sparse", stride=6), rtol=1e-5, atol=1e-6)


def test_backend_choice():
    x = lambda dtype, D=64, device="cpu": torch.empty(1, 1, 8, D, dtype=dtype, device=device)
    assert backend_for(x(torch.float32), 128) == "cpu_flash"
    assert backend_for(x(torch.bfloat16), 128, "math") == "math"
    assert backend_for(x(torch.bfloat16, device="meta"), 128) == "math"  # not CUDA: matmuls
    with pytest.raises(ValueError, match="backend='triton'"):
        hsa_residue(*_qkv(8, 1, 1)[:3], local=True, strided=True, stride=2, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_never_builds_a_txt_matrix(backend):
    """Forward and backward: no op output comes near even one T×T matrix (B·H = 4 of them)."""
    T, l = 512, 16
    q, k, v, g = _qkv(T, 2, 2)
    q.requires_grad_()
    with _Largest() as seen:
        hsa_residue(q, k, v, local=True, strided=True, stride=l, backend=backend).backward(g)
    assert seen.numel * 4 <= T * T, f"an op produced {seen.numel} elements"


# -- on a GPU --------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("T,l", [(1000, 125), (1024, 128), (300, 7)])
def test_cuda_bfloat16_flash_matches_oracle(T, l, pattern):
    q, k, v, g = _qkv(T, 4, 2, D=64, dtype=torch.bfloat16, device="cuda")
    assert backend_for(q, 128) == "cuda_flash"
    _check(_run(q, k, v, g, pattern, l), _oracle(q, k, v, g, l, pattern), 3e-2, f"cuda bf16 {pattern}")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_float32_matches_oracle(pattern):
    q, k, v, g = _qkv(200, 4, 4, D=32, device="cuda")
    _check(_run(q, k, v, g, pattern, 16), _oracle(q, k, v, g, 16, pattern), 1e-4, f"cuda fp32 {pattern}")
    assert K.choose_attention_kernel(q, k, v, local=True, strided=True, stride=16) == "residue"
