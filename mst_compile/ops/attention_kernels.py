"""Kernels of hybrid sparse attention (docs/design.md §5): causal attention restricted to a pattern,
computed without ever forming a T×T score matrix, forward and backward.

For query i, key j <= i and stride l:

- local   (the band):    i - j < l
- strided (residues):    (i - j) mod l == 0
- sparse:                local ∪ strided, one softmax over both key sets

The two key sets are computed as separate partial attentions and merged exactly by their
log-sum-exp (lse): with lse = logaddexp(lse₁, lse₂), out = e^(lse₁-lse)·out₁ + e^(lse₂-lse)·out₂.
To keep the sets disjoint the strided part of ``sparse`` leaves out j == i (it is in the band).

- band: queries in blocks of ``b`` rows; block [s, s+b) needs keys [s-l+1, s+b-1], i.e. a window of
  W = l+b-1 consecutive keys. The windows overlap, so they are an ``as_strided`` view of one padded
  copy of K (no gather), and one fused attention call does all blocks with a (b, W) band mask.
- residues: with T padded to n·l, position a·l + r is row a of residue class r, so
  ``K.view(n, l, D).transpose`` is "l sequences of length n" and the strided part is plain causal
  attention along n (shifted by one row to exclude j == i).

Three implementations, picked by ``hsa_kernel``:

- fp32 CPU with a band (``local``, ``sparse``): the fused C++ kernel of ``attention_cpu`` (one pass
  per block of query rows over band and residue keys), when it can be built; above T/l = 48 residue
  keys per row it does the band only and the residues go through flash attention (``_HSAHybrid``);
- other CPU cases (``strided``, other dtypes, no compiler): the stock path below. The partial
  attentions are ``aten::_scaled_dot_product_flash_attention_for_cpu``, which returns its lse, and
  the backward calls its backward op once per part with the MERGED output and lse: that gives each
  part's exact share of dQ and of dK/dV for its own keys, so the backward skips the masked work too;
- other devices (CUDA): ``attention_residue``, three mask-free causal attention calls (flash
  kernels on fp16/bf16) merged by lse; it runs on CPU too (``hsa_kernel(..., kernel="residue")``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_cpu
from .attention_residue import hsa_residue

_NEG = float("-inf")
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


HYBRID_ABOVE = 48  # T/l above which the residues go through flash attention (measured: fused wins to T/l = 32)


def band_block(l: int) -> int:
    """Query rows per band block of the flash path. A block of b rows computes l+b-1 keys per row
    for l useful ones, so small b wastes less, but the flash kernel's per-block overhead grows."""
    return max(16, min(64, l // 2))


@dataclass(frozen=True)
class _Plan:
    """Where every piece of one (T, l, pattern) computation lives in the padded buffers."""

    T: int
    l: int
    local: bool
    strided: bool
    shift: int  # 1: residue part excludes j == i (it is in the band), 0: includes it
    b: int  # band block rows
    ll: int  # band width min(l, T)
    W: int  # band window keys per block
    nb: int  # band blocks
    n: int  # residue rows (T padded to n·l)
    front: int  # zero rows in front of K/V so the first windows start at key -ll+1
    Tq: int  # padded sequence length of Q (covers nb·b and n·l)

    @staticmethod
    def make(T: int, l: int, local: bool, strided: bool) -> _Plan:
        ll = min(l, T)
        b = band_block(ll) if local else 1
        nb = -(-T // b) if local else 0
        n = -(-T // l)
        shift = 1 if local else 0
        Tq = max(nb * b, n * l if strided else 0, T)
        front = ll - 1 if local else 0
        return _Plan(T, l, local, strided and n - shift > 0, shift, b, ll, ll + b - 1, nb, n, front, Tq)


@lru_cache(maxsize=8)
def _band_mask(p: _Plan, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive (1, nb, b, W) mask: 0 where key c of block blk is in the band of row r, else -inf."""
    blk = torch.arange(p.nb, device=device)[:, None, None]
    r = torch.arange(p.b, device=device)[None, :, None]
    c = torch.arange(p.W, device=device)[None, None, :]
    key = blk * p.b + c - p.front  # absolute key position; < 0 is front padding
    ok = (c >= r) & (c <= r + p.ll - 1) & (key >= 0)  # (nb, b, W)
    return torch.zeros(1, p.nb, p.b, p.W, dtype=dtype, device=device).masked_fill_(~ok, _NEG)


def _pack(x: Tensor, groups: int, rows: int, front: int) -> Tensor:
    """(B, H, T, D) -> zero-padded contiguous (B·H·groups, rows, D) with x at rows [front, front+T)."""
    B, H, T, D = x.shape
    if groups == 1 and front == 0 and rows == T and x.is_contiguous():
        return x.view(B * H, T, D)
    out = x.new_empty(B, H, groups, rows, D)
    out[:, :, :, :front].zero_()
    out[:, :, :, front + T:].zero_()
    out[:, :, :, front:front + T] = x[:, :, None]
    return out.view(B * H * groups, rows, D)


def _windows(kp: Tensor, p: _Plan) -> Tensor:
    """Overlapping band windows of a packed K or V: (BH, nb, W, D) view, block blk = rows [blk·b, blk·b+W)."""
    BH, rows, D = kp.shape
    return kp.as_strided((BH, p.nb, p.W, D), (rows * D, p.b * D, D, 1), kp.storage_offset())


def _residues(x: Tensor, p: _Plan, start: int = 0) -> Tensor:
    """Rows [start, start+n·l) of a packed tensor as (BH, l, n, D): residue class r along dim 1."""
    BH, _, D = x.shape
    return x[:, start:start + p.n * p.l].view(BH, p.n, p.l, D).transpose(1, 2)


def _positions(x: Tensor) -> Tensor:
    """(BH, G, L, D) or (BH, G, L) part layout with position = L-major·G -> (BH, G·L[, D]) in position order."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _blocks(x: Tensor) -> Tensor:
    """(BH, nb, b[, D]) band-block layout (block-major) -> (BH, nb·b[, D])."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _explicit(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None, scale: float):
    """Reference partial attention with plain ops (autograd-friendly): returns (out, lse)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., L, S), L and S are block sizes, never T×T
    if mask is not None:
        s = s + mask
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), _NEG)
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _parts_forward(qp: Tensor, kp: Tensor, vp: Tensor, p: _Plan, scale: float, attend, inplace: bool = False):
    """Run the band and residue parts on packed buffers; return (out, lse) over positions [0, Tq).

    ``inplace`` merges into the band's buffers (they are fresh copies, and the flash path keeps no
    autograd graph); the autograd path builds new tensors instead."""
    BH, _, D = qp.shape
    out = lse = None
    if p.local:
        qv = qp[:, :p.nb * p.b].view(BH, p.nb, p.b, D)  # (BH, nb, b, D)
        o1, l1 = attend(qv, _windows(kp, p), _windows(vp, p), False, _band_mask(p, qp.dtype, qp.device), scale)
        out, lse = _blocks(o1), _blocks(l1)  # (BH, nb·b, D), (BH, nb·b)
    if p.strided:
        s = p.shift
        qr, kr, vr = _residues(qp, p), _residues(kp, p, p.front), _residues(vp, p, p.front)  # (BH, l, n, D)
        o2, l2 = attend(qr[:, :, s:], kr[:, :, :p.n - s], vr[:, :, :p.n - s], True, None, scale)
        o2, l2 = _positions(o2), _positions(l2)  # positions [s·l, n·l)
        if out is None:
            out, lse = o2, l2
        else:
            lo, hi = s * p.l, min(p.n * p.l, out.shape[1])  # band and residue rows both exist here
            m1, m2 = lse[:, lo:hi], l2[:, :hi - lo]
            both = torch.logaddexp(m1, m2)
            if inplace:
                w2 = (m2 - both).exp_()[..., None]
                out[:, lo:hi].mul_((m1 - both).exp_()[..., None]).addcmul_(o2[:, :hi - lo], w2)
                lse[:, lo:hi] = both
                return out, lse
            mixed = torch.exp(m1 - both)[..., None] * out[:, lo:hi] + torch.exp(m2 - both)[..., None] * o2[:, :hi - lo]
            out = torch.cat([out[:, :lo], mixed.to(out.dtype), out[:, hi:]], 1)
            lse = torch.cat([lse[:, :lo], both, lse[:, hi:]], 1)
    return out, lse


def _flash_attend(q, k, v, causal, mask, scale):
    return _FLASH(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _fold_windows(dw: Tensor, p: _Plan, rows: int) -> Tensor:
    """Adjoint of ``_windows``: sum each window's gradient back onto the packed rows (BH, rows, D)."""
    BH, _, _, D = dw.shape
    nbb = p.nb * p.b
    out = dw.new_empty(BH, rows + p.b, D)  # + b: the last chunk may reach past the packed rows
    out[:, :nbb].view(BH, p.nb, p.b, D).copy_(dw[:, :, :p.b])  # chunk 0 covers rows [0, nb·b) once
    out[:, nbb:].zero_()
    for o in range(p.b, p.W, p.b):
        w = min(p.b, p.W - o)
        out[:, o:o + p.nb * p.b].view(BH, p.nb, p.b, D)[:, :, :w] += dw[:, :, o:o + w]
    return out[:, :rows]


class _HSAFlash(torch.autograd.Function):
    """Band ∪ residues on CPU through the fused flash kernel; exact merged backward."""

    @staticmethod
    def forward(ctx, q, k, v, p: _Plan, scale: float):
        B, H, T, D = q.shape
        g = H // k.shape[1]
        qp = _pack(q, 1, p.Tq, 0)  # (BH, Tq, D)
        kp, vp = _pack(k, g, p.front + p.Tq, p.front), _pack(v, g, p.front + p.Tq, p.front)
        out, lse = _parts_forward(qp, kp, vp, p, scale, _flash_attend, inplace=True)
        if out.shape[1] < p.Tq:  # rows past T only need finite values: their output gradient is 0
            out, lse = F.pad(out, (0, 0, 0, p.Tq - out.shape[1])), F.pad(lse, (0, p.Tq - lse.shape[1]))
        ctx.save_for_backward(qp, kp, vp, out, lse)
        ctx.plan, ctx.scale, ctx.shape = p, scale, (B, H, k.shape[1], T, D)
        return out[:, :T].view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad):
        qp, kp, vp, outp, lsep = ctx.saved_tensors
        p, scale = ctx.plan, ctx.scale
        B, H, Hkv, T, D = ctx.shape
        BH, rows = B * H, kp.shape[1]
        gp = _pack(grad, 1, p.Tq, 0)  # (BH, Tq, D), zero on padded rows
        dq = dk = dv = None
        if p.local:
            nbb = p.nb * p.b
            view = lambda x: x[:, :nbb].view(BH, p.nb, p.b, *x.shape[2:])
            dq1, dkw, dvw = _FLASH_BWD(
                view(gp), view(qp), _windows(kp, p), _windows(vp, p), view(outp), view(lsep), 0.0, False,
                attn_mask=_band_mask(p, qp.dtype, qp.device), scale=scale,
            )
            dq = _blocks(dq1) if nbb == p.Tq else F.pad(_blocks(dq1), (0, 0, 0, p.Tq - nbb))
            dk, dv = _fold_windows(dkw, p, rows), _fold_windows(dvw, p, rows)
        if p.strided:
            s, m = p.shift, p.n - p.shift
            res = lambda x, start=0: _residues(x, p, start)
            lr = lsep[:, :p.n * p.l].view(BH, p.n, p.l).transpose(1, 2)  # (BH, l, n)
            dq2, dk2, dv2 = _FLASH_BWD(
                res(gp)[:, :, s:], res(qp)[:, :, s:], res(kp, p.front)[:, :, :m], res(vp, p.front)[:, :, :m],
                res(outp)[:, :, s:], lr[:, :, s:], 0.0, True, scale=scale,
            )
            if dq is None:  # strided only: the residues cover every row
                dq, dk, dv = _positions(dq2), _positions(dk2), _positions(dv2)
            else:
                dq[:, s * p.l:p.n * p.l] += _positions(dq2)
                dk[:, p.front:p.front + m * p.l] += _positions(dk2)
                dv[:, p.front:p.front + m * p.l] += _positions(dv2)
        g = H // Hkv
        dq = dq[:, :T].view(B, H, T, D)
        dk = dk[:, p.front:p.front + T].view(B, Hkv, g, T, D).sum(2)
        dv = dv[:, p.front:p.front + T].view(B, Hkv, g, T, D).sum(2)
        return dq, dk, dv, None, None


def _hsa_explicit(q: Tensor, k: Tensor, v: Tensor, p: _Plan, scale: float) -> Tensor:
    """Same layout with matmuls and autograd (any device/dtype)."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    qp = F.pad(q.reshape(B * H, T, D), (0, 0, 0, p.Tq - T))
    pad = lambda x: F.pad(x.repeat_interleave(g, 1).reshape(B * H, T, D), (0, 0, p.front, p.Tq - T))
    out, _ = _parts_forward(qp, pad(k), pad(v), p, scale, _explicit)
    return out[:, :T].view(B, H, T, D)


class _HSAHybrid(torch.autograd.Function):
    """``sparse`` with many residue keys per row (T/l large): the band by the fused kernel, the
    residues by flash attention along the residue classes (GEMM-sized there, where the fused
    kernel's per-key dot products are not), merged by lse; each backward gets the merged out/lse."""

    @staticmethod
    def forward(ctx, q, k, v, l: int, scale: float):
        B, H, T, D = q.shape
        g, BH = H // k.shape[1], B * H
        p = _Plan.make(T, l, False, True)  # residue layout: n rows of l, T padded to n·l
        out, lse = torch.ops.mst_hsa.forward(q, k, v, l, True, False, scale)  # band: (B, H, T, D), (B, H, T)
        out, lse = out.view(BH, T, D), lse.view(BH, T)
        qp, kp, vp = _pack(q, 1, p.Tq, 0), _pack(k, g, p.Tq, 0), _pack(v, g, p.Tq, 0)  # (BH, n·l, D)
        res = lambda x: _residues(x, p)
        o2, l2 = _FLASH(res(qp)[:, :, 1:], res(kp)[:, :, :-1], res(vp)[:, :, :-1], 0.0, True, scale=scale)
        o2, l2 = _positions(o2)[:, :T - l], _positions(l2)[:, :T - l]  # rows l..T-1
        m1 = lse[:, l:]
        both = torch.logaddexp(m1, l2)
        out[:, l:].mul_((m1 - both).exp_()[..., None]).addcmul_(o2, (l2 - both).exp_()[..., None])
        lse[:, l:] = both
        ctx.save_for_backward(q, k, v, qp, kp, vp, out, lse)
        ctx.plan, ctx.scale = p, scale
        return out.view(B, H, T, D)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, qp, kp, vp, out, lse = ctx.saved_tensors
        p, scale, l = ctx.plan, ctx.scale, ctx.plan.l
        B, H, T, D = q.shape
        Hkv, BH = k.shape[1], B * H
        dq, dk, dv = torch.ops.mst_hsa.backward(grad, q, k, v, out.view(B, H, T, D), lse.view(B, H, T), l, True, False, scale)
        gp, op = _pack(grad, 1, p.Tq, 0), F.pad(out, (0, 0, 0, p.Tq - T))
        lp = F.pad(lse, (0, p.Tq - T)).view(BH, p.n, l).transpose(1, 2)  # (BH, l, n)
        res = lambda x: _residues(x, p)
        dq2, dk2, dv2 = _FLASH_BWD(
            res(gp)[:, :, 1:], res(qp)[:, :, 1:], res(kp)[:, :, :-1], res(vp)[:, :, :-1], res(op)[:, :, 1:],
            lp[:, :, 1:], 0.0, True, scale=scale,
        )
        dq.view(BH, T, D)[:, l:] += _positions(dq2)[:, :T - l]
        dk[:, :, :T - l] += _positions(dk2)[:, :T - l].view(B, Hkv, H // Hkv, T - l, D).sum(2)
        dv[:, :, :T - l] += _positions(dv2)[:, :T - l].view(B, Hkv, H // Hkv, T - l, D).sum(2)
        return dq, dk, dv, None, None


def choose_attention_kernel(q: Tensor, k: Tensor, v: Tensor, *, local: bool, strided: bool, stride: int) -> str:
    """Which implementation ``hsa_kernel`` runs: "fused", "fused+flash", "flash", "residue" or "matmul"."""
    if q.device.type != "cpu":
        return "residue"
    cpu = q.dtype == k.dtype == v.dtype
    if cpu and local and q.dtype == torch.float32 and attention_cpu.available():
        return "fused+flash" if strided and q.shape[-2] // stride > HYBRID_ABOVE else "fused"
    return "flash" if cpu and q.dtype in _FLASH_DTYPES else "matmul"


def hsa_kernel(q: Tensor, k: Tensor, v: Tensor, *, local: bool, strided: bool, stride: int, scale: float | None,
               kernel: str | None = None) -> Tensor:
    """Causal attention over the band (``local``) and/or residues (``strided``) of stride ``stride``.

    q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0; arguments are assumed validated.
    ``kernel`` forces one of ``choose_attention_kernel``'s answers (default: its choice).
    """
    T, D = q.shape[-2:]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kernel = kernel or choose_attention_kernel(q, k, v, local=local, strided=strided, stride=stride)
    if kernel == "residue":
        return hsa_residue(q, k, v, local=local, strided=strided, stride=stride, scale=scale)
    if kernel == "fused":
        return attention_cpu.HSAFusedCPU.apply(q, k, v, stride, local, strided, scale)
    if kernel == "fused+flash":
        return _HSAHybrid.apply(q, k, v, stride, scale)
    p = _Plan.make(T, stride, local, strided)
    if kernel == "flash":
        return _HSAFlash.apply(q, k, v, p, scale)
    return _hsa_explicit(q, k, v, p, scale)
