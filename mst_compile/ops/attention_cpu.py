"""Fused CPU kernel for the band ∪ residue patterns (fp32), built on first use.

The stock-kernel path (``attention_kernels``) runs the band and the residues as two fused attention
calls and merges them; the bookkeeping around them (padded copies, window gradients W/b times the
size of K, the merge, a second pass over every row for a handful of residue keys) costs as much as
the band itself at T = 1024. This kernel does one pass per block of 32 query rows instead:

    S = scale · Q_blk · K[j0 : j0+W]ᵀ           one GEMM over the band window (W = l + 31 keys)
    s_t = scale · q_i · k_(i - t·l)              the ⌊i/l⌋ residue keys of row i, dot products
    one softmax over both sets, lse saved
    O_blk = P · V[j0 : j0+W] + Σ_t p_t · v_(i - t·l)

and the backward recomputes P from the lse (dQ, dK, dV by three more GEMMs per block, residue
keys by axpy), parallel over key/value heads so dK/dV need no atomics. It reads q/k/v in any layout
whose last dim is contiguous (nanoGPT's transposed views need no copy).

It is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ninja are needed) into the
torch extensions cache the first time it is used, once per environment (``kernel_build``: a waiting
process gives up after ``MST_HSA_BUILD_TIMEOUT`` seconds, default 300). ``MST_HSA_CPP=0`` turns it
off; a failed or timed-out build falls back to the stock-kernel path with one warning.
``python -m mst_compile.ops.attention_cpu`` builds it ahead of time.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import kernel_build

_SOURCE_FILE = Path(__file__).parent / "csrc" / "hsa_cpu.cpp"  # shipped as package data (pyproject.toml)

_state: dict = {}


def available() -> bool:
    """Build (once per environment, see ``kernel_build``) and load the kernel; False when it cannot be had."""
    if "ok" in _state:
        return _state["ok"]
    _state["ok"] = False
    if os.environ.get("MST_HSA_CPP", "1") == "0":
        return False
    try:
        kernel_build.load_extension("mst_hsa", _SOURCE_FILE)
        _register_fakes()
        _state["ok"] = True
    except Exception as e:  # no compiler, no ninja, a build lock held too long: the stock path works
        warnings.warn(f"mst_compile: the fused CPU attention kernel is not available ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using the stock-kernel path",
                      stacklevel=2)
    return _state["ok"]


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile, FakeTensor): the ops return fresh contiguous tensors."""

    @torch.library.register_fake("mst_hsa::forward")
    def _fwd(q, k, v, l, local, strided, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:-1])

    @torch.library.register_fake("mst_hsa::backward")
    def _bwd(go, q, k, v, out, lse, l, local, strided, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class HSAFusedCPU(torch.autograd.Function):
    """Band (``local``) and/or residues (``strided``) of stride ``l`` on fp32 CPU tensors, fused."""

    @staticmethod
    def forward(ctx, q, k, v, l: int, local: bool, strided: bool, scale: float):
        out, lse = torch.ops.mst_hsa.forward(q, k, v, l, local, strided, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (l, local, strided, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.mst_hsa.backward(grad, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


if __name__ == "__main__":  # build ahead of time, e.g. right after installing
    print("fused CPU attention kernel:", "ready" if available() else "not available (see the warning)")
