"""Store sparse weights of an ONNX model as ``sparse_initializer`` entries (COO), so the file shrinks
with sparsity. onnxruntime densifies them when it loads the model, so it runs unchanged.

Encoding: values (the nonzeros, in the weight's dtype) and int64 *linearized* indices (one index per
nonzero, ascending, the 1-D form of the ONNX spec; the checker requires int64). A float32 weight
then costs 12 bytes per nonzero instead of 4 per entry, so COO only pays below density 1/3: a
weight is stored sparse when its density is below ``max_density`` AND the COO form is smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class SparseEntry:
    name: str
    shape: tuple[int, ...]
    density: float
    dense_bytes: int
    sparse_bytes: int


def to_sparse_initializers(model: onnx.ModelProto, max_density: float = 0.5, min_numel: int = 64) -> list[SparseEntry]:
    """Move every float initializer (2-D or more, ``min_numel`` entries or more) whose density is below
    ``max_density`` and whose COO encoding is smaller into ``graph.sparse_initializer``, in place.

    Density is measured on the stored values, so a tied weight (one initializer) moves once.
    """
    graph = model.graph
    moved: list[SparseEntry] = []
    keep = []
    for init in graph.initializer:
        entry = _sparse_form(init, max_density, min_numel)
        if entry is None:
            keep.append(init)
            continue
        sparse, info = entry
        graph.sparse_initializer.append(sparse)
        moved.append(info)
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return moved


def _sparse_form(init: onnx.TensorProto, max_density: float, min_numel: int):
    if init.data_type not in _FLOATS or len(init.dims) < 2 or init.data_location == onnx.TensorProto.EXTERNAL:
        return None
    numel = int(np.prod(init.dims))
    if numel < min_numel:
        return None
    flat = numpy_helper.to_array(init).reshape(-1)  # (numel,)
    nz = np.flatnonzero(flat)  # ascending linearized indices
    density = nz.size / numel
    dense_bytes = numel * flat.itemsize
    sparse_bytes = nz.size * (flat.itemsize + 8)
    if density >= max_density or sparse_bytes >= dense_bytes:
        return None
    values = numpy_helper.from_array(flat[nz], init.name)  # (nnz,), named like the dense initializer
    indices = numpy_helper.from_array(nz.astype(np.int64), f"{init.name}.indices")  # (nnz,)
    sparse = helper.make_sparse_tensor(values, indices, list(init.dims))
    return sparse, SparseEntry(init.name, tuple(init.dims), density, dense_bytes, sparse_bytes)
