"""export/validate.py: the shapes checked, the length limit, the probe for a model's maximum length
against a scan of every length, inputs drawn like the examples, and compare() on a hand-built ONNX file
against numpy, passing and failing."""
import numpy as np
import pytest
import torch

from mst_compile.errors import ExportValidationError, MstCompileError
from mst_compile.export.validate import check_length_limit, probe_limit, random_like, validation_shapes


def test_validation_shapes():
    assert validation_shapes(2, 16) == [(2, 16), (3, 9)]
    assert validation_shapes(1, 2) == [(1, 2), (2, 3)]  # too short to halve: one longer
    assert validation_shapes(2, 16, [16, 32]) == [(2, 16), (3, 9), (2, 32)]  # no shape twice
    assert validation_shapes(4, None) == [(4, None), (5, None)]


def test_length_limit():
    check_length_limit([8, 16], 16, "model.onnx")
    check_length_limit([10_000], None, "model.onnx")
    with pytest.raises(MstCompileError, match=r"^sequence length 33 is beyond the maximum sequence length 16 of model.onnx .*"
                                              r"check lengths up to 16$"):
        check_length_limit([8, 33, 20], 16, "model.onnx")
    with pytest.raises(ValueError, match=r"integers >= 1, got \[0, True\]"):
        check_length_limit([0, True, 4], 16, "model.onnx")


@pytest.mark.parametrize("limit", [8, 9, 13, 31, 32, 40, 64])
def test_probe_limit_finds_the_longest_length_that_runs(limit):
    tried = []

    def runs(T):
        tried.append(T)
        return T <= limit

    got = probe_limit(runs, 8, 64)
    assert got == (None if limit >= 64 else limit)  # a scan of every length 8..64 finds the same
    assert len(tried) <= 12  # doubling then bisecting, not a scan


def test_random_like_keeps_dtype_and_range():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[3, 7, 5]])
    x = random_like(ids, 4, 6, g)
    assert x.shape == (4, 6) and x.dtype == ids.dtype and int(x.min()) >= 3 and int(x.max()) <= 7
    f = random_like(torch.randn(2, 3, 5) * 10, 1, 4, g)
    assert f.shape == (1, 4, 5) and f.dtype == torch.float32 and 3 < float(f.std()) < 30
    assert random_like(torch.ones(2, 3, dtype=torch.bool), 5, None, g).shape == (5, 3)


def test_compare_runs_onnxruntime_against_the_reference(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper, save

    from mst_compile.export.validate import compare

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 3])],
                              [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    example = torch.randn(2, 5, 4)
    seen = []

    def reference(x):
        seen.append(tuple(x.shape))
        return [x @ torch.from_numpy(w)]

    diffs = compare(path, reference, [example], lengths=[7])
    assert set(diffs) == {"y"} and diffs["y"] < 1e-5
    assert seen == [(2, 5, 4), (3, 3, 4), (2, 7, 4)]
    with pytest.raises(ExportValidationError, match=r"m.onnx: onnxruntime \(cpu\) and PyTorch disagree beyond atol=0.0001 "
                                                     r"on \['y'\]") as e:
        compare(path, lambda x: [x @ torch.from_numpy(w) + 1e-2], [example])
    assert e.value.diffs["y"] == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(MstCompileError, match=r"has 1 inputs \(\['x'\]\) but 2 example inputs were given"):
        compare(path, reference, [example, example])
