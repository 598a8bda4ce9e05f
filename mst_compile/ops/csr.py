"""Compressed (CSR) kernels for the sparse linear op: MST's FLOP savings as wall-clock time on CPU.

The masked-dense path (``mst::sparse_linear``) multiplies a weight that is zero off the mask, so it
does the full dense work. Below a crossover density the CSR path does only the active work:

- forward   y  = x @ Wᵀ      computed as (W_csr @ xᵀ)ᵀ        (sparse × dense)
- backward  dx = gy @ W      computed as (Wᵀ_csr @ gyᵀ)ᵀ      (a CSR of Wᵀ, cached beside W's)
- backward  dW = (gyᵀ @ x) ⊙ mask, computed only at the active positions (sampled dense-dense
  product, SDDMM); the full dense gradient gyᵀ @ x is formed only when the runtime asks for it
  through ``probe`` (the step before a topology update), exactly as on the masked-dense path.

The sparsity structure (row pointers, column indices, and where each stored value lives in the dense
weight) depends only on the mask, so it is built once per mask and cached; the values are gathered
from the dense weight on every forward (one gather of nnz elements), so optimizer steps need no hook.
The dense ``nn.Parameter`` stays the source of truth: optimizers, checkpoints and the topology update
see an ordinary dense tensor and an ordinary dense gradient that is zero off the mask.

Measured on the 2-core AVX-512 CPU (torch 2.13, fp32, 1024 tokens, GPT-2-small shapes, see
``benchmarks/csr_kernels.py``): dense GEMM runs at ~180 GFLOP/s; sparse × dense at ~55 GFLOP/s of useful
work with torch's vectorized ``spmm_reduce`` kernel (~30 with the MKL sparse BLAS path of ``@``); the
SDDMM at ~50 GFLOP/s (int32 indices: ~4x faster than int64). The transposes between token-major
activations and the feature-major layout the sparse kernels need cost ~10% of the CSR time.
Forward+backward breaks even around density 0.18-0.29 (quiet to loaded machine) (at 0.2 CSR ran 1.1-1.4x faster, at 0.1 about 2x,
at 0.05 about 3-3.5x, at 0.5 about 0.5-0.6x); "auto" takes CSR below the lowest break-even measured
(``crossovers.csr_crossover``, written by ``benchmarks/csr_kernels.py --package``).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..constants import SPARSE_KERNELS, TILE_KERNELS
from .crossovers import csr_crossover

_CSR_DTYPES = (torch.float32, torch.float64)  # what torch's CPU sparse kernels support


def choose_linear_kernel(density: float, device: torch.device | str, shape: tuple[int, ...] | None = None,
                  setting: str = "auto") -> str:
    """Pick "dense" (masked-dense) or "csr" for one sparse weight.

    ``setting`` is ``MSTConfig.sparse_kernel``: "dense" and "csr" force a path; "auto" takes CSR only
    on CPU and only below the crossover density measured there. On GPU "auto" keeps the masked-dense
    path (no crossover was measured on a GPU); "csr" still forces the CSR path, which runs on any
    device torch's sparse CSR ops support (only the CPU path is tested).
    """
    if setting not in SPARSE_KERNELS or setting in TILE_KERNELS:
        unstructured = ", ".join(k for k in SPARSE_KERNELS if k not in TILE_KERNELS)
        raise ValueError(f"sparse_kernel={setting!r} is invalid for an unstructured mask: expected one of {unstructured} "
                         "(the tile kernels need MSTConfig.tile)")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density!r} is invalid: expected a number in [0, 1]")
    if setting != "auto":
        return setting
    if torch.device(device).type != "cpu":
        return "dense"
    if shape is not None and min(shape) < 64:
        return "dense"  # tiny matrices: call overhead outweighs any saving
    return "csr" if density < csr_crossover() else "dense"


def csr_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether the CSR path can run on these inputs; otherwise the caller uses the masked-dense op.

    Tracing (torch.compile, torch.export, FX proxies, fake tensors) always sees the masked-dense
    custom op, so captured graphs and exported models never contain sparse-layout tensors.
    """
    return (
        type(x) is torch.Tensor
        and isinstance(weight, torch.Tensor)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and weight.dim() == 2
        and x.dtype == weight.dtype
        and weight.dtype in _CSR_DTYPES
        and x.device == weight.device
        and x.numel() > 0
        and x.dim() >= 2
    )


class CsrStructure:
    """The cached sparsity structure of one mask, as used at one orientation.

    ``mask`` is stored as the weight is stored: (out, in), or (in, out) when ``transposed`` (HF Conv1D).
    The effective weight is W = weight (or weightᵀ), shape (out, in). Kept per orientation:
    - crow, col, idx:        CSR of W (row-major order); ``idx`` is where each value lives in the
                             weight as stored, flattened, so ``weight.reshape(-1)[idx]`` are W's values
    - crow_t, col_t, perm_t: CSR of Wᵀ (the CSC of W), used by the input gradient; its values are
                             ``values[perm_t]``, a gather from the compact vector
    - pattern:               CSR of W with unit values, the sampling pattern of the SDDMM
    """

    def __init__(self, mask: Tensor, transposed: bool = False):
        m = mask.t() if transposed else mask  # (out, in)
        out_f, in_f = m.shape
        self.shape = (out_f, in_f)
        self.transposed = transposed
        self.mask = mask
        self.version = (mask._version, mask.data_ptr(), mask.device)
        self.nnz = int(m.sum())

        def _csr(mm: Tensor, storage_index):
            rows, cols = mm.nonzero(as_tuple=True)  # sorted by row, then column
            counts = torch.bincount(rows, minlength=mm.shape[0])
            crow = torch.zeros(mm.shape[0] + 1, dtype=torch.int32, device=mm.device)
            crow[1:] = torch.cumsum(counts, 0)
            # int32 indices: the SDDMM ran ~4x faster than with int64 ones
            return crow, cols.to(torch.int32), storage_index(rows, cols)

        # flat position in the weight as stored of W[r, c]
        def w_index(r, c):
            return c * out_f + r if transposed else r * in_f + c

        self.crow, self.col, self.idx = _csr(m, w_index)
        self.crow_t, self.col_t, idx_t = _csr(m.t(), lambda c, r: w_index(r, c))
        # Wᵀ's values are a permutation of W's: gather them from the compact value vector
        where = torch.empty(out_f * in_f, dtype=torch.long, device=mask.device)
        where[self.idx] = torch.arange(self.nnz, device=mask.device)
        self.perm_t = where[idx_t]  # (nnz,) position in W's values of each value of Wᵀ
        if mask.numel() < 2**31:  # int32 gathers run as fast and halve the cache's memory
            self.idx, self.perm_t = self.idx.to(torch.int32), self.perm_t.to(torch.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.pattern = torch.sparse_csr_tensor(
                self.crow, self.col, torch.ones(self.nnz, device=mask.device), self.shape)

    def valid_for(self, mask: Tensor) -> bool:
        """True while ``mask`` is the same tensor, unmodified in place, on the same device."""
        return self.version == (mask._version, mask.data_ptr(), mask.device)

    def values(self, weight: Tensor) -> Tensor:
        """The active values of the current dense weight, in W's CSR order."""
        return weight.reshape(-1).index_select(0, self.idx)  # (nnz,)

    def weight_csr(self, values: Tensor) -> Tensor:
        """W as a CSR tensor (out, in)."""
        return _make_csr(self.crow, self.col, values, self.shape)

    def weight_t_csr(self, values: Tensor) -> Tensor:
        """Wᵀ as a CSR tensor (in, out), from W's values."""
        return _make_csr(self.crow_t, self.col_t, values.index_select(0, self.perm_t), self.shape[::-1])


def _spmm(a: Tensor, b: Tensor) -> Tensor:
    """CSR (M, K) @ row-major dense (K, N). On CPU torch's vectorized spmm_reduce kernel ran ~1.7x
    faster than the MKL sparse BLAS path (55 vs 30 GFLOP/s on the 2-core AVX-512 CPU)."""
    if a.device.type == "cpu":
        return torch.sparse.mm(a, b, "sum")
    return a @ b


def _make_csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape)


# Tokens per chunk: the dense operand of each sparse product (features x tokens) is kept near 8 MB so
# it stays in the 32 MB L3. Measured at 4096 tokens, 3072 -> 768: 424 ms chunked vs 678 ms whole;
# at 1024 tokens chunking made no difference.
_CHUNK_FLOATS = 2 * 1024 * 1024
_MIN_CHUNK = 256  # tokens; fewer make the per-chunk overhead show


def _chunk(st: CsrStructure) -> int:
    return max(_MIN_CHUNK, _CHUNK_FLOATS // max(st.shape))


class _CsrLinear(torch.autograd.Function):
    """y = x @ Wᵀ + b on the CSR layout; gradients match ``mst::sparse_linear``.

    Tokens are processed in chunks (see ``_chunk``); each chunk is transposed to the feature-major
    layout the sparse kernels want and back, so the result has the dense path's layout.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, probe: Tensor, st: CsrStructure):
        out_f, in_f = st.shape
        x2 = x.reshape(-1, in_f)  # (N, in)
        y = torch.empty(x2.shape[0], out_f, dtype=x.dtype, device=x.device)  # (N, out)
        c = _chunk(st)
        xTs = []
        with torch.no_grad():
            w = st.weight_csr(st.values(weight))
            for s in range(0, x2.shape[0], c):
                xT = x2[s:s + c].t().contiguous()  # (in, n): the sparse kernels want it row-major
                yT = _spmm(w, xT)  # (out, n)
                if bias is not None:
                    yT.add_(bias.unsqueeze(1))  # contiguous broadcast: cheaper before the transpose
                y[s:s + c] = yT.t()
                xTs.append(xT)
        ctx.save_for_backward(weight, *xTs)
        ctx.st, ctx.x_shape, ctx.has_bias = st, x.shape, bias is not None
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        weight, *xTs = ctx.saved_tensors
        st = ctx.st
        need_x, need_w, need_b, need_probe, _ = ctx.needs_input_grad
        gy2 = grad_y.reshape(-1, st.shape[0])  # (N, out)
        c = _chunk(st)
        grad_x = grad_w = grad_b = grad_probe = None
        if need_x:
            grad_x = torch.empty(gy2.shape[0], st.shape[1], dtype=gy2.dtype, device=gy2.device)  # (N, in)
            wt = st.weight_t_csr(st.values(weight))
        dense = vals = None
        for xT, s in zip(xTs, range(0, gy2.shape[0], c)):
            gyT = gy2[s:s + c].t().contiguous()  # (out, n)
            if need_x:
                grad_x[s:s + c] = _spmm(wt, gyT).t()
            if need_probe:
                # the dense weight gradient, asked for before a topology update; in stored orientation
                part = xT @ gyT.t() if st.transposed else gyT @ xT.t()  # (in, out) | (out, in)
                dense = part if dense is None else dense.add_(part)
            elif need_w:
                part = torch.sparse.sampled_addmm(st.pattern, gyT, xT.t(), beta=0.0).values()  # (nnz,)
                vals = part if vals is None else vals.add_(part)
            if need_b and ctx.has_bias:
                grad_b = gyT.sum(1) if grad_b is None else grad_b.add_(gyT.sum(1))
        if need_x:
            grad_x = grad_x.view(ctx.x_shape)
        if need_probe:
            grad_probe = dense
            if need_w:
                grad_w = dense * st.mask
        elif need_w:
            grad_w = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
            grad_w.index_put_((st.idx,), vals)
            grad_w = grad_w.view(weight.shape)
        return grad_x, grad_w, grad_b, grad_probe, None


def csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None, probe: Tensor, st: CsrStructure) -> Tensor:
    """``x @ Wᵀ + bias`` on the CSR path, W = weight (or weightᵀ when ``st.transposed``).

    ``weight`` and ``probe`` are passed as stored (not transposed); ``probe`` follows the
    masked-dense op's contract: a 2-D tensor requiring grad receives the dense gradient.
    """
    if probe.dim() == 2 and probe.dtype != weight.dtype:
        probe = probe.to(weight.dtype)
    return _CsrLinear.apply(x, weight, bias, probe, st)
