"""The op tables of the passes: which call targets are matmuls, attention, views, casts or shape queries.

One table for every pass. A target is a ``call_function``'s function (torch or ATen level, as
``torch.fx.symbolic_trace`` and ``torch.export`` spell it) or a ``call_method``'s name as a string.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

# -- matmuls and attention -------------------------------------------------------------------
LINEAR = {F.linear, torch._C._nn.linear, aten.linear.default}
ADDMM = {torch.addmm, aten.addmm.default, "addmm"}
BADDBMM = {torch.baddbmm, aten.baddbmm.default, "baddbmm"}
MATMUL = {operator.matmul, torch.matmul, torch.Tensor.matmul, aten.matmul.default, "matmul", torch.mm, aten.mm.default, "mm"}
BMM = {torch.bmm, aten.bmm.default, "bmm"}
EINSUM = {torch.einsum, torch.functional.einsum, aten.einsum.default}
SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, aten.softmax.int, aten._softmax.default, "softmax"}
DROPOUT = {F.dropout, aten.dropout.default, "dropout"}

# -- elementwise ops of a hand-written attention's scores ------------------------------------
MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"}
DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"}
ADD = {operator.add, torch.add, aten.add.Tensor, "add"}
FILL = {torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor, "masked_fill"}
WHERE = {torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}

# -- views and casts -------------------------------------------------------------------------
# keep a tensor's values and shape: a weight seen through them is still the weight
SAME = {"contiguous", aten.contiguous.default, aten.alias.default, aten.clone.default, "clone", "to", "type",
        "float", "half", "bfloat16", "double", aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}
CAST = SAME | {"type_as"}  # what may sit between an attention's softmax and its @ v
T = {torch.t, aten.t.default, aten.numpy_T.default, "t"}
TRANSPOSE = {torch.transpose, aten.transpose.int, "transpose", torch.swapaxes, "swapaxes", "swapdims"}
PERMUTE = {torch.permute, aten.permute.default, "permute"}
RESHAPE = {torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default, "view", "reshape"}
UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default, "unsqueeze"}
EXPAND = {aten.expand.default, "expand"}
VIEWS = SAME | T | TRANSPOSE | PERMUTE | RESHAPE | UNSQUEEZE | EXPAND

# uses of a tensor that read only its shape, dtype or device, never its values
SHAPE_ONLY = {"size", "dim", "numel", "new_ones", "new_zeros", "new_empty", "new_full", torch.numel,
              aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_tensor_metadata.default,
              aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
              torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like, aten.ones_like.default,
              aten.zeros_like.default, aten.empty_like.default, aten.full_like.default}
ASSERTS = {aten._assert_tensor_metadata.default}  # export's metadata checks: erased with what they check
SHAPE_ATTRS = ("shape", "dtype", "device", "ndim")  # getattr(x, name) that read no values


def key(node: fx.Node):
    """The op of a call node: its function, or its method name."""
    return node.target if node.op in ("call_function", "call_method") else None


def is_op(node, targets) -> bool:
    """True when ``node`` is a call of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def shape_only(node: fx.Node) -> bool:
    """True for a use that reads a tensor's shape, dtype or device, never its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in SHAPE_ATTRS
    return is_op(node, SHAPE_ONLY)
