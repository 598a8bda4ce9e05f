"""export/attention_onnx.py: the ONNX translation of ``mst_export::hsa`` on its own (whole models are in
tests/export/test_onnx.py). One tiny module of the op, exported once with the sequence length symbolic,
runs in onnxruntime at lengths that are and are not multiples of the stride, against softmax over the keys
a hand-built boolean mask allows; no intermediate is T×T; a pattern without translation is one line."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mst_compile.export.attention import hsa_op
from mst_compile.export.attention_onnx import hsa_onnx

SCALE = 0.5
CASES = [(p, s) for p in ("local", "strided", "sparse") for s in (3, 0)]  # stride 0: T/8 at run time


def _oracle(q, k, v, pattern, stride):
    """Softmax over the keys query i may attend: j <= i, and j in its band (i - j < l) and/or its residue
    class (i - j a multiple of l)."""
    T = q.shape[-2]
    l = stride or max(1, T // 8)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    local, strided = (j <= i) & (i - j < l), (j <= i) & ((i - j) % l == 0)
    keep = {"local": local, "strided": strided, "sparse": local | strided}[pattern]
    s = np.where(keep, (q @ np.swapaxes(k, -1, -2)) * SCALE, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


class _Patterns(torch.nn.Module):
    def forward(self, q, k, v):
        return tuple(hsa_op(q, k, v, pattern, stride, SCALE) for pattern, stride in CASES)


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 11, 4, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 11, 6, generator=g)  # values wider than keys
    T = torch.export.Dim("T", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Patterns().eval(), (q, k, v), dynamo=True, optimize=False, verbose=False,
                                    input_names=["q", "k", "v"], dynamic_shapes=({2: T}, {2: T}, {2: T}),
                                    custom_translation_table={hsa_op._opoverload: hsa_onnx})
    return program.model_proto


def _inputs(T, seed=1):
    r = np.random.default_rng([seed, T])
    return {"q": r.standard_normal((2, 3, T, 4), np.float32), "k": r.standard_normal((2, 3, T, 4), np.float32),
            "v": r.standard_normal((2, 3, T, 6), np.float32)}


def test_plain_onnx_ops_and_a_symbolic_length(model):
    assert {n.domain for n in model.graph.node} == {""}, "no custom op left for onnxruntime to resolve"
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert dims[2].dim_param and not dims[2].HasField("dim_value")


@pytest.mark.parametrize("T", [1, 2, 5, 11, 12, 16, 29, 40])
def test_every_pattern_is_softmax_over_its_mask(model, T):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _inputs(T)
    outs = sess.run(None, x)
    for (pattern, stride), got in zip(CASES, outs, strict=True):
        assert got.shape == (2, 3, T, 6)
        want = _oracle(*(x[n].astype(np.float64) for n in "qkv"), pattern, stride)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=f"{pattern} stride={stride} T={T}")


def test_no_intermediate_is_t_by_t(model):
    """Every intermediate value as an output, at T = 29 (l = 3 for both strides, n = 10 blocks)."""
    m = onnx.shape_inference.infer_shapes(model)
    typed = {vi.name: vi for vi in m.graph.value_info}
    outs = {o.name for o in m.graph.output}
    inner = [o for n in m.graph.node for o in n.output if o and o not in outs]
    assert inner and all(o in typed for o in inner), "every intermediate must be checked"
    m.graph.output.extend(typed[o] for o in inner)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    T = 29
    values = sess.run(None, _inputs(T))
    assert len(values) == len(outs) + len(inner)
    big = [v.shape for v in values if v.ndim >= 2 and v.shape[-1] == v.shape[-2] == T]
    assert not big, f"a T×T value: {big}"


def test_a_pattern_without_translation_is_one_line():
    x = _inputs(4)  # onnxscript's eager mode runs the shared ops, then the pattern is refused
    for pattern in ("dense", "banded"):
        with pytest.raises(ValueError) as e:
            hsa_onnx(x["q"], x["k"], x["v"], pattern, 0, SCALE)
        assert str(e.value) == f"mst_export::hsa: pattern {pattern!r} has no ONNX translation (dense is plain SDPA)"
