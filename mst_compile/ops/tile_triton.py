"""Triton kernels of tile-structured weights: y = x Wᵀ and dx = dy W over the active tiles, and the
weight gradient on the active tiles only (a sampled dense-dense product).

Inputs in fp16, bf16 (or fp32), accumulation in fp32 (``tl.dot``; fp32 inputs use TF32 on the GPU).
Both kernels read tiles where they lie in the dense weight, by strides, so a transposed view (HF
``Conv1D``, or Wᵀ for the input gradient) needs no copy:

- ``_mm``: program (m, j) computes tokens [m·BM, (m+1)·BM) × output columns j·BN.. of row r of the tile
  grid, summing x-block · tileᵀ over the tiles of that row (``ptr``/``idx``, ``TileLayout``). A row
  without active tiles writes zeros.
- ``_sddmm``: program (p, j, s) computes a BR × BC block of active tile p over chunk s of the tokens,
  into an fp32 partial; ``_sddmm_sum`` adds the chunks in order and writes the tile. Deterministic
  (no atomics), and the chunks keep the GPU busy when few tiles are active.

Tiles smaller than 16 (``tl.dot``'s smallest block) are loaded into 16-wide blocks with the rest masked
to zero; edge tiles are clipped by the same masks. Kernels are defined per setting of
``TRITON_INTERPRET`` (read when they are first used): with ``TRITON_INTERPRET=1`` Triton's interpreter
runs them on CPU tensors (fp32 and fp16), which is how they are tested without a GPU. Importing this
module needs Triton (``available()`` says whether it is installed).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    """Whether Triton is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: the kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


tl = None  # triton.language, bound by _kernels(): the kernels below read it as a module global (the interpreter patches globals)


def _mm(x, w, y, ptr, idx, M, N_OUT, K_IN, sxm, sxk, swn, swk, sym, syn,
        TILE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NSUB: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_n // NSUB  # row of the tile grid
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_t = (pid_n % NSUB) * BN + tl.arange(0, BN)  # output columns inside the tile
    n_idx = r * TILE + offs_t
    n_ok = (offs_t < TILE) & (n_idx < N_OUT)
    m_ok = offs_m < M
    acc = tl.full((BM, BN), 0.0, tl.float32)  # (not tl.zeros: a @jit helper the interpreter cannot patch once triton is imported)
    start = tl.load(ptr + r)
    end = tl.load(ptr + r + 1)
    for p in range(start, end):
        c = tl.load(idx + p)
        for kk in range(0, TILE, BK):
            offs_k = kk + tl.arange(0, BK)
            k_idx = c * TILE + offs_k
            k_ok = (offs_k < TILE) & (k_idx < K_IN)
            a = tl.load(x + offs_m[:, None] * sxm + k_idx[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w + n_idx[None, :] * swn + k_idx[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(a, b)  # (BM, BK) @ (BK, BN): the tile's transpose
    tl.store(y + offs_m[:, None] * sym + n_idx[None, :] * syn, acc.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _sddmm(gy, x, part, rows, cols, M, N_OUT, K_IN, CHUNK, sgm, sgn, sxm, sxk,
           TILE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, NC: tl.constexpr):
    p = tl.program_id(0)
    sub = tl.program_id(1)
    s = tl.program_id(2)  # which chunk of CHUNK tokens this program reduces
    r = tl.load(rows + p)
    c = tl.load(cols + p)
    offs_r = (sub // NC) * BR + tl.arange(0, BR)
    offs_c = (sub % NC) * BC + tl.arange(0, BC)
    n_idx = r * TILE + offs_r
    k_idx = c * TILE + offs_c
    r_ok = (offs_r < TILE) & (n_idx < N_OUT)
    c_ok = (offs_c < TILE) & (k_idx < K_IN)
    acc = tl.full((BR, BC), 0.0, tl.float32)
    m_lo = s * CHUNK
    for m0 in range(m_lo, tl.minimum(m_lo + CHUNK, M), BM):
        offs_m = m0 + tl.arange(0, BM)
        m_ok = offs_m < M
        a = tl.load(gy + offs_m[None, :] * sgm + n_idx[:, None] * sgn, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        b = tl.load(x + offs_m[:, None] * sxm + k_idx[None, :] * sxk, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc += tl.dot(a, b)  # (BR, BM) @ (BM, BC)
    # part: (S, P, TILE, TILE) fp32, the chunk's partial sum of tile p
    base = part + (s * tl.num_programs(0) + p) * TILE * TILE
    in_tile = (offs_r[:, None] < TILE) & (offs_c[None, :] < TILE)
    tl.store(base + offs_r[:, None] * TILE + offs_c[None, :], acc, mask=in_tile)


def _sddmm_sum(part, g, rows, cols, S, N_OUT, K_IN, son, sok,
               TILE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr):
    p = tl.program_id(0)
    sub = tl.program_id(1)
    r = tl.load(rows + p)
    c = tl.load(cols + p)
    offs_r = (sub // NC) * BR + tl.arange(0, BR)
    offs_c = (sub % NC) * BC + tl.arange(0, BC)
    n_idx = r * TILE + offs_r
    k_idx = c * TILE + offs_c
    in_tile = (offs_r[:, None] < TILE) & (offs_c[None, :] < TILE)
    acc = tl.full((BR, BC), 0.0, tl.float32)
    for s in range(0, S):  # in chunk order: the sum is the same at every call (no atomics)
        base = part + (s * tl.num_programs(0) + p) * TILE * TILE
        acc += tl.load(base + offs_r[:, None] * TILE + offs_c[None, :], mask=in_tile, other=0.0)
    ok = in_tile & (n_idx[:, None] < N_OUT) & (k_idx[None, :] < K_IN)
    tl.store(g + n_idx[:, None] * son + k_idx[None, :] * sok, acc.to(g.dtype.element_ty), mask=ok)


@functools.cache
def _kernels(interpret: bool):
    """(mm, sddmm, sddmm_sum) jitted under the current ``TRITON_INTERPRET`` (``triton.jit`` reads it when it decorates)."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_mm), triton.jit(_sddmm), triton.jit(_sddmm_sum)


def _block(tile: int, cap: int) -> int:
    """A block edge for a tile: the tile itself (at least 16, tl.dot's smallest), at most ``cap``."""
    return min(max(tile, 16), cap)


def mm(x: Tensor, w: Tensor, ptr: Tensor, idx: Tensor, tile: int) -> Tensor:
    """y (N, out) = x (N, in) @ wᵀ over the active tiles of w (out, in), walked by rows of the grid."""
    N, K = x.shape
    O = w.shape[0]
    y = torch.empty(N, O, dtype=x.dtype, device=x.device)
    if N == 0 or O == 0:
        return y
    kernel = _kernels(interpreting())[0]
    BM, BN, BK = 64, _block(tile, 64), _block(tile, 64)
    nsub = -(-max(tile, BN) // BN)
    grid = (-(-N // BM), (ptr.numel() - 1) * nsub)
    kernel[grid](x, w, y, ptr, idx, N, O, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                 TILE=tile, BM=BM, BN=BN, BK=BK, NSUB=nsub)
    return y


def _splits(n_programs: int, M: int, BM: int, device: torch.device) -> int:
    """Chunks of tokens the weight gradient is split into: enough programs to fill the GPU (about 4 per
    multiprocessor), each chunk at least 4 blocks of BM tokens, and only from 16384 tokens up.

    Measured on an H200 (bf16, GPT-2-small fc shapes, tile density 0.1, device time,
    benchmarks/results/gpu/): at 32768 tokens the split takes the kernel from 0.21-0.22 ms to
    0.08-0.10 ms (one program per active tile leaves most of the 132 multiprocessors idle); at 8192
    tokens it gained in three shapes (0.07 to 0.04 ms) and lost in one (0.071 to 0.088 ms), and the
    compiled GPT-2-small step at 8192 tokens was slower with it, so below 16384 tokens it stays off."""
    if device.type != "cuda" or M < 16384:
        return 1
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-want // n_programs), M // (4 * BM)))


def sddmm(gy: Tensor, x: Tensor, rows: Tensor, cols: Tensor, tile: int, split: int | None = None) -> Tensor:
    """(out, in) = gyᵀ @ x on the tiles (rows[i], cols[i]), zero elsewhere, in gy's dtype.

    The tokens are reduced in ``split`` chunks (None: ``_splits``), each into an fp32 partial tile,
    then summed in chunk order by a second kernel: deterministic, no atomics."""
    N, O = gy.shape
    K = x.shape[1]
    g = torch.zeros(O, K, dtype=gy.dtype, device=gy.device)
    if rows.numel() == 0:
        return g
    kernel, sum_kernel = _kernels(interpreting())[1:]
    BR = BC = _block(tile, 64)
    BM = 64
    nc = -(-max(tile, BC) // BC)
    S = split or _splits(rows.numel() * nc * nc, N, BM, gy.device)
    per_chunk = -(-N // S)
    chunk = -(-per_chunk // BM) * BM  # tokens per chunk, a multiple of BM
    S = max(1, -(-N // chunk))
    part = torch.empty(S, rows.numel(), tile, tile, dtype=torch.float32, device=gy.device)
    kernel[(rows.numel(), nc * nc, S)](gy, x, part, rows, cols, N, O, K, chunk, gy.stride(0), gy.stride(1), x.stride(0), x.stride(1),
                                      TILE=tile, BR=BR, BC=BC, BM=BM, NC=nc)
    sum_kernel[(rows.numel(), nc * nc)](part, g, rows, cols, S, O, K, g.stride(0), g.stride(1), TILE=tile, BR=BR, BC=BC, NC=nc)
    return g
