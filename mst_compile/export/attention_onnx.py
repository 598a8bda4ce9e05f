"""ONNX translation of ``mst_export::hsa``: the blocked sparse attention of ``attention.py``, op for op.

q (B, H, T, Dk), k (B, H, T, Dk), v (B, H, T, Dv); T is symbolic. With l the stride (T/8 at run
time when 0) and n = ceil(T / l), the sequence is zero-padded to n·l and viewed as (n, l):

- local:   block c of l queries against the 2l keys of blocks c-1 and c   -> (B, H, n, l, 2l) scores
- strided: residue class r, causal along the n rows                      -> (B, H, l, n, n) scores
- sparse:  [band | strided keys except j == i] under one softmax          -> (B, H, n, l, 2l + n)

Masks are built from ``Range`` over n and l, so nothing of size T×T exists in the graph.
"""
from __future__ import annotations

from onnxscript import opset18 as op

from ..constants import STRIDE_DIVISOR


def _ints(*values: int):
    return op.Constant(value_ints=list(values))


def _scalar(x):
    return op.Squeeze(x, _ints(0))  # (1,) -> ()


def _t(x, perm):
    return op.Transpose(x, perm=perm)


def hsa_onnx(q, k, v, pattern: str, stride: int, scale: float):
    shape = op.Shape(q)  # [B, H, T, Dk]
    bh, T = op.Slice(shape, _ints(0), _ints(2)), op.Slice(shape, _ints(2), _ints(3))
    dk, dv = op.Slice(shape, _ints(3), _ints(4)), op.Shape(v, start=3, end=4)
    one = _ints(1)
    l = _ints(stride) if stride > 0 else op.Max(op.Div(T, _ints(STRIDE_DIVISOR)), one)
    n = op.Div(op.Sub(op.Add(T, l), one), l)  # ceil(T / l)
    pad = op.Concat(_ints(0), op.Sub(op.Mul(n, l), T), axis=0)  # [before, after] on axis 2

    def blocks(x, d):  # (B, H, T, d) -> (B, H, n, l, d)
        return op.Reshape(op.Pad(x, pad, None, _ints(2)), op.Concat(bh, n, l, d, axis=0))

    qb, kb, vb = blocks(q, dk), blocks(k, dk), blocks(v, dv)
    sc = op.CastLike(op.Constant(value_float=float(scale)), q)
    neg = op.CastLike(op.Constant(value_float=float("-inf")), q)
    n0, l0 = _scalar(n), _scalar(l)
    zero, step = op.Constant(value_int=0), op.Constant(value_int=1)

    def strided_scores(diagonal: bool):  # (B, H, l, n, n), query row a against key rows a' of its class
        s = op.Mul(op.MatMul(_t(qb, [0, 1, 3, 2, 4]), _t(kb, [0, 1, 3, 4, 2])), sc)
        a = op.Range(zero, n0, step)
        rows, cols = op.Unsqueeze(a, _ints(1)), op.Unsqueeze(a, _ints(0))
        ok = op.LessOrEqual(cols, rows) if diagonal else op.Less(cols, rows)
        return op.Where(ok, s, neg)

    def window(x, d):  # (B, H, n, 2l, d): blocks c-1 and c side by side
        first = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(bh, one, l, d, axis=0))
        prev = op.Concat(first, op.Slice(x, _ints(0), _ints(-1), _ints(2)), axis=2)
        return op.Concat(prev, x, axis=3)

    def local_scores():  # (B, H, n, l, 2l)
        s = op.Mul(op.MatMul(qb, _t(window(kb, dk), [0, 1, 2, 4, 3])), sc)
        c = op.Reshape(op.Range(zero, n0, step), _ints(-1, 1, 1))
        r = op.Reshape(op.Range(zero, l0, step), _ints(1, -1, 1))
        w = op.Reshape(op.Range(zero, op.Mul(l0, op.Constant(value_int=2)), step), _ints(1, 1, -1))
        in_band = op.And(op.Greater(w, r), op.LessOrEqual(w, op.Add(r, l0)))
        after_start = op.GreaterOrEqual(op.Add(op.Mul(c, l0), w), l0)  # drops keys before position 0
        return op.Where(op.And(in_band, after_start), s, neg)

    if pattern == "strided":
        p = op.Softmax(strided_scores(True), axis=-1)
        out = _t(op.MatMul(p, _t(vb, [0, 1, 3, 2, 4])), [0, 1, 3, 2, 4])  # (B, H, n, l, Dv)
    elif pattern == "local":
        out = op.MatMul(op.Softmax(local_scores(), axis=-1), window(vb, dv))
    elif pattern == "sparse":
        s = op.Concat(local_scores(), _t(strided_scores(False), [0, 1, 3, 2, 4]), axis=-1)  # (B, H, n, l, 2l + n)
        p = op.Softmax(s, axis=-1)
        two_l = op.Mul(l, _ints(2))
        p_loc = op.Slice(p, _ints(0), two_l, _ints(-1))
        p_str = op.Slice(p, two_l, op.Add(two_l, n), _ints(-1))
        out_str = _t(op.MatMul(_t(p_str, [0, 1, 3, 2, 4]), _t(vb, [0, 1, 3, 2, 4])), [0, 1, 3, 2, 4])
        out = op.Add(op.MatMul(p_loc, window(vb, dv)), out_str)
    else:
        raise ValueError(f"mst_export::hsa: pattern {pattern!r} has no ONNX translation (dense is plain SDPA)")
    out = op.Reshape(out, op.Concat(bh, op.Mul(n, l), dv, axis=0))  # (B, H, n·l, Dv)
    return op.Slice(out, _ints(0), T, _ints(2))  # (B, H, T, Dv)
