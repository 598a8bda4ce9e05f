"""Hybrid sparse attention written in ONNX-exportable torch ops, with the skipping structure kept.

For query i, key j <= i and stride l (docs/design.md §5):

- dense:   every j <= i (plain causal SDPA)
- local:   i - j < l        -> banded blocks: queries in blocks of l rows see 2l keys
- strided: (i - j) mod l == 0 -> T padded to n·l, reshaped (n, l): causal attention along n inside
                                 each of the l residue classes
- sparse:  local ∪ strided   -> both score sets side by side under ONE softmax

No T×T score matrix is formed: local costs T·2l scores per head, strided T·n = T²/l. The band and
the strided keys share only j == i (every other strided key is at distance >= l), so ``sparse``
drops the diagonal from the strided set and the concatenated softmax is exact.

``stride=None`` means T/8 of the running length, computed from T at run time.

For ONNX, the sparse patterns go through the custom op ``mst_export::hsa`` (eager: the torch code
below) which ``attention_onnx.py`` translates into the same blocked computation in ONNX ops. Tracing
the torch code itself with a symbolic T costs torch.export seconds of shape algebra per site;
the op keeps the export of a deep model as fast as a dense one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import STRIDE_DIVISOR

_NEG = float("-inf")


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv·groups, T, D): grouped-query heads, each kv head used by ``groups`` queries."""
    if groups == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, groups, T, D).reshape(B, H * groups, T, D)


def _blocks(x: Tensor, n, l) -> Tensor:
    """(B, H, T, D) -> zero-padded (B, H, n, l, D): row a·l + r at [a, r]."""
    B, H, T, D = x.shape
    return F.pad(x, (0, 0, 0, n * l - T)).reshape(B, H, n, l, D)


def _local_scores(qb: Tensor, kb: Tensor, n, l, scale: float) -> Tensor:
    """Band scores (B, H, n, l, 2l): block c of queries against keys of blocks c-1 and c."""
    B, H, _, _, D = kb.shape
    prev = torch.cat([kb.new_zeros(B, H, 1, l, D), kb[:, :, :-1]], 2)  # (B, H, n, l, D) block c-1
    kw = torch.cat([prev, kb], 3)  # (B, H, n, 2l, D)
    s = torch.matmul(qb, kw.transpose(-1, -2)) * scale  # (B, H, n, l, 2l)
    # query (c, r) is position c·l + r, window key w is position (c-1)·l + w: allowed if 0 <= i - j < l
    c = torch.arange(n, device=qb.device)[:, None, None]
    r = torch.arange(l, device=qb.device)[None, :, None]
    w = torch.arange(2 * l, device=qb.device)[None, None, :]
    ok = (w > r) & (w <= r + l) & (c * l + w >= l)  # (n, l, 2l); the last term drops keys before 0
    return s.masked_fill(~ok, _NEG)


def _strided_scores(qb: Tensor, kb: Tensor, n, l, scale: float, diagonal: bool) -> Tensor:
    """Residue-class scores (B, H, l, n, n): row a of class r against rows a' of the same class."""
    qr, kr = qb.transpose(2, 3), kb.transpose(2, 3)  # (B, H, l, n, D)
    s = torch.matmul(qr, kr.transpose(-1, -2)) * scale  # (B, H, l, n, n)
    a = torch.arange(n, device=qb.device)
    ok = a[None, :] <= a[:, None] if diagonal else a[None, :] < a[:, None]  # (n, n) causal along n
    return s.masked_fill(~ok, _NEG)


def pattern_attention(q: Tensor, k: Tensor, v: Tensor, *, pattern: str, stride=None, scale=None) -> Tensor:
    """Causal attention restricted to ``pattern``; q, k, v (B, H, T, D) with the same heads."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    if pattern == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    l = stride if stride is not None else torch.sym_max(1, T // STRIDE_DIVISOR)  # sym_max: no guard on T when traced
    n = (T + l - 1) // l
    qb, kb, vb = _blocks(q, n, l), _blocks(k, n, l), _blocks(v, n, l)  # (B, H, n, l, D)
    if pattern == "strided":
        p = torch.softmax(_strided_scores(qb, kb, n, l, scale, True), -1)  # (B, H, l, n, n)
        out = torch.matmul(p, vb.transpose(2, 3)).transpose(2, 3)  # (B, H, n, l, Dv)
        return out.reshape(B, H, n * l, Dv)[:, :, :T]
    s_loc = _local_scores(qb, kb, n, l, scale)  # (B, H, n, l, 2l)
    prev = torch.cat([vb.new_zeros(B, H, 1, l, Dv), vb[:, :, :-1]], 2)
    vw = torch.cat([prev, vb], 3)  # (B, H, n, 2l, Dv)
    if pattern == "local":
        out = torch.matmul(torch.softmax(s_loc, -1), vw)  # (B, H, n, l, Dv)
        return out.reshape(B, H, n * l, Dv)[:, :, :T]
    # sparse: one softmax over [band keys | strided keys] of each query
    s_str = _strided_scores(qb, kb, n, l, scale, False).transpose(2, 3)  # (B, H, n, l, n)
    p = torch.softmax(torch.cat([s_loc, s_str], -1), -1)  # (B, H, n, l, 2l + n)
    p_loc, p_str = p[..., : 2 * l], p[..., 2 * l:]
    out = torch.matmul(p_loc, vw) + torch.matmul(p_str.transpose(2, 3), vb.transpose(2, 3)).transpose(2, 3)  # (B, H, n, l, Dv)
    return out.reshape(B, H, n * l, Dv)[:, :, :T]


@torch.library.custom_op("mst_export::hsa", mutates_args=())
def hsa_op(q: Tensor, k: Tensor, v: Tensor, pattern: str, stride: int, scale: float) -> Tensor:
    """``pattern_attention`` as one opaque op (stride 0 = T/8); q, k, v with the same heads."""
    return pattern_attention(q, k, v, pattern=pattern, stride=stride or None, scale=scale)


@hsa_op.register_fake
def _(q, k, v, pattern, stride, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_AS_OP = [False]


@contextlib.contextmanager
def as_op():
    """Within this context, sparse patterns of ``export_attention`` run as the ``mst_export::hsa`` op."""
    _AS_OP[0] = True
    try:
        yield
    finally:
        _AS_OP[0] = False


def export_attention(q, k, v, attn_mask=None, scale=None, enable_gqa=False, *, pattern: str, stride=None) -> Tensor:
    """Drop-in for a ``HybridSparseAttention`` call: same arguments, the pattern fixed at export."""
    squeeze = q.dim() == 3  # (B·H, T, D) from a bmm-style spelling
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    scale = None if scale is None else float(scale)
    k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    if pattern == "dense" and attn_mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    elif pattern != "dense" and _AS_OP[0]:
        out = hsa_op(q, k, v, pattern, stride or 0, q.shape[-1] ** -0.5 if scale is None else scale)
    else:
        out = pattern_attention(q, k, v, pattern=pattern, stride=stride, scale=scale)
    return out[0] if squeeze else out
