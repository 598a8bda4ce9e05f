"""export/sparse_init.py: sparse weights move to COO sparse initializers only when that is smaller, the
file shrinks, and onnxruntime computes exactly what the dense file computed."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from mst_compile.export.sparse_init import to_sparse_initializers


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """y = x @ W1 @ W2 ... with every W an initializer (a chain of MatMuls of width 16)."""
    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def _sparse(density, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    w[rng.random((16, 16)) >= density] = 0.0
    return w


def test_sparse_weights_move_and_outputs_stay_the_same():
    weights = {"dense": _sparse(1.0, 0), "sparse": _sparse(0.1, 1), "third": _sparse(0.4, 2)}
    model = _model(weights)
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    before, size = _run(model, x), model.ByteSize()
    moved = to_sparse_initializers(model)  # max_density 0.5, but COO pays only below 1/3 for float32
    assert [e.name for e in moved] == ["sparse"]
    e = moved[0]
    nnz = int(np.count_nonzero(weights["sparse"]))
    assert e.shape == (16, 16) and e.density == pytest.approx(nnz / 256)
    assert (e.dense_bytes, e.sparse_bytes) == (256 * 4, nnz * (4 + 8))
    assert sorted(i.name for i in model.graph.initializer) == ["dense", "third"]
    sp = model.graph.sparse_initializer[0]
    idx = numpy_helper.to_array(sp.indices)
    assert idx.dtype == np.int64 and np.array_equal(idx, np.flatnonzero(weights["sparse"]))  # linearized, ascending
    onnx.checker.check_model(model)
    assert model.ByteSize() < size
    np.testing.assert_array_equal(_run(model, x), before)


def test_small_and_non_float_tensors_stay_dense():
    w = _sparse(0.05, 4)
    model = _model({"w": w})
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 8), np.int64), "ints"))
    assert to_sparse_initializers(model, min_numel=257) == []  # 256 entries: too small
    assert [e.name for e in to_sparse_initializers(model, max_density=0.01)] == []  # denser than asked
    assert [e.name for e in to_sparse_initializers(model)] == ["w"]  # the all-zero int64 tensor stays
    assert [i.name for i in model.graph.initializer] == ["ints"]
