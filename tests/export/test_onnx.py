"""export_onnx: onnxruntime agrees with PyTorch (dense and 90% sparse weights, dense and sparse
attention), sparse initializers shrink the file, metadata round-trips, a tampered file is caught."""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _models import MLP, hf_gpt2, hf_llama, tiny_gpt

import mst_compile
from mst_compile.export import read_metadata, validate_onnx

MAKERS = {"tiny_gpt": tiny_gpt, "hf_gpt2": hf_gpt2, "hf_llama": hf_llama}


def _ids(b=2, t=16, seed=1):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _build(case, sparsity=0.0):
    torch.manual_seed(0)
    model = MAKERS[case]()
    x = _ids()
    example = (x,) if case == "tiny_gpt" else {"input_ids": x}
    sm = mst_compile.sparsify(model, example_inputs=example)
    if sparsity:
        sm.mst.set_sparsity(sparsity)
    return model, sm, example


def _logits(out):
    return (out.logits if hasattr(out, "logits") else out).detach().numpy()


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _builds_t_by_t(path, x) -> bool:
    """Run the file with EVERY intermediate value as an output: does any have shape (..., T, T)?"""
    m = onnx.load(str(path))
    del m.graph.value_info[:]
    for sp in m.graph.sparse_initializer:  # densified here only so that shape inference can type everything
        dense = np.zeros(int(np.prod(sp.dims)), np.float32)
        dense[onnx.numpy_helper.to_array(sp.indices)] = onnx.numpy_helper.to_array(sp.values)
        m.graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(tuple(sp.dims)), sp.values.name))
    del m.graph.sparse_initializer[:]
    m = onnx.shape_inference.infer_shapes(m)
    typed = {vi.name: vi for vi in m.graph.value_info}
    outs = {o.name for o in m.graph.output}
    inner = [o for n in m.graph.node for o in n.output if o not in outs]
    assert all(o in typed for o in inner), "every intermediate must be checked"
    m.graph.output.extend(typed[o] for o in inner)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    T = x.shape[1]
    values = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return any(v.ndim >= 2 and v.shape[-1] == v.shape[-2] == T for v in values)


CASES = [
    ("tiny_gpt", 0.0, None),
    ("tiny_gpt", 0.9, None),
    ("tiny_gpt", 0.0, "sparse"),
    ("tiny_gpt", 0.9, "sparse"),
    pytest.param("hf_gpt2", 0.0, None, marks=pytest.mark.slow),  # 20-25 s each on a loaded 2-core CPU
    pytest.param("hf_gpt2", 0.9, "sparse", marks=pytest.mark.slow),
    pytest.param("hf_llama", 0.0, None, marks=pytest.mark.slow),
    pytest.param("hf_llama", 0.9, "sparse", marks=pytest.mark.slow),
    pytest.param("hf_gpt2", 0.9, None, marks=pytest.mark.slow),
    pytest.param("hf_gpt2", 0.0, "sparse", marks=pytest.mark.slow),
    pytest.param("hf_llama", 0.9, None, marks=pytest.mark.slow),
    pytest.param("hf_llama", 0.0, "strided", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case, sparsity, attention", CASES)
def test_export_validates_against_pytorch(tmp_path, case, sparsity, attention):
    model, sm, example = _build(case, sparsity)
    path = tmp_path / "nested" / "dir" / f"{case}.onnx"  # a missing folder is created
    res = mst_compile.export_onnx(sm, path, example, attention=attention)
    assert path.is_file() and res.size == path.stat().st_size
    assert res.max_diff and max(res.max_diff.values()) <= 1e-4
    # independent check at a new batch and sequence length: the oracle is the user's own model
    # (masks folded in place) for dense attention, the runtime HSA op for sparse patterns
    x = _ids(3, 9, seed=5)
    if attention is None:
        with torch.no_grad():
            want = _logits(model.eval()(input_ids=x) if case != "tiny_gpt" else model.eval()(x))
    else:
        sm.mst.set_attention(attention)
        with torch.no_grad():
            want = _logits(sm(input_ids=x) if case != "tiny_gpt" else sm(x))
    np.testing.assert_allclose(_ort(path, x), want, atol=1e-4, rtol=0)
    g = onnx.load(str(path)).graph
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert _builds_t_by_t(path, _ids(1, 30)) == (attention is None), "sparse attention must not build a T×T matrix"
    assert (len(g.sparse_initializer) > 0) == (sparsity > 0)
    assert not any(n.domain.startswith("mst") for n in g.node)
    assert set(res.metadata["attention"].values()) == {attention or "dense"}
    assert set(res.metadata["stride"].values()) == {"T/8"}
    assert res.metadata["density"] == pytest.approx(1.0 - sparsity, abs=1e-3)  # before any training: dense


@pytest.mark.slow
def test_sparse_initializers_shrink_file_and_keep_one_tied_weight(tmp_path):
    model, sm, example = _build("tiny_gpt", 0.9)
    dense = mst_compile.export_onnx(sm, tmp_path / "dense.onnx", example, sparse_initializers=False, validate=False)
    sparse = mst_compile.export_onnx(sm, tmp_path / "sparse.onnx", example)
    assert sparse.size < dense.size
    g = onnx.load(str(tmp_path / "sparse.onnx")).graph
    vocab, d = model.wte.weight.shape
    tied = [t for t in [*g.initializer, *(s.values for s in g.sparse_initializer)] if t.name.endswith("wte.weight")
            or t.name.endswith("lm_head.weight")]
    assert len(tied) == 1, "the tied embedding / lm_head weight must stay one initializer"
    by_name = {s.values.name: s for s in g.sparse_initializer}
    params = dict(model.named_parameters())
    for e in sparse.sparse_initializers:  # each COO entry decodes to the parameter itself
        s = by_name[e.name]
        dense_w = np.zeros(int(np.prod(s.dims)), np.float32)
        dense_w[onnx.numpy_helper.to_array(s.indices)] = onnx.numpy_helper.to_array(s.values)
        p = params[e.name] if e.name in params else params["wte.weight"]
        np.testing.assert_array_equal(dense_w.reshape(tuple(s.dims)), p.detach().numpy())
        assert e.density < 0.5 and e.sparse_bytes < e.dense_bytes
    assert {e.name for e in sparse.sparse_initializers} >= {"h.0.mlp.0.weight", "h.1.attn.c_attn.weight"}


def test_metadata_round_trip(tmp_path):
    _, sm, example = _build("tiny_gpt", 0.9)
    sm.mst.set_attention("sparse", stride=4)
    res = mst_compile.export_onnx(sm, tmp_path / "m.onnx", example, metadata={"train_config": {"lr": 0.001, "steps": 7}})
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta == res.metadata
    assert meta["version"] == mst_compile.__version__
    assert meta["densities"] == sm.mst.densities() and meta["density"] == sm.mst.density()
    assert meta["attention"] == {"h.0.attn": "sparse", "h.1.attn": "sparse"}
    assert meta["stride"] == {"h.0.attn": 4, "h.1.attn": 4}
    assert meta["config"] == sm.mst.config.to_dict()
    assert meta["train_config"] == {"lr": 0.001, "steps": 7}
    assert sorted(meta["sparse_initializers"]) == sorted(e.name for e in res.sparse_initializers)


def test_tampered_model_fails_validation(tmp_path):
    _, sm, example = _build("tiny_gpt", 0.5)
    path = tmp_path / "m.onnx"
    mst_compile.export_onnx(sm, path, example)
    assert max(validate_onnx(path, sm, example).values()) <= 1e-4
    m = onnx.load(str(path))
    init = next(t for t in m.graph.initializer if t.name == "wpe.weight")  # position embeddings: stored dense
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[:, 0] += 0.5  # one feature of every position (a uniform shift would vanish in the LayerNorm)
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(path))
    with pytest.raises(mst_compile.ExportValidationError, match=r"output: \d") as e:
        validate_onnx(path, sm, example)
    assert e.value.diffs["output"] > 1e-4
    assert "output" in str(e.value) and "atol=0.0001" in str(e.value)


@pytest.mark.slow
def test_plain_model_exports_with_its_sparse_weights(tmp_path):
    model, sm, example = _build("hf_gpt2", 0.9)
    res = mst_compile.export_onnx(model, tmp_path / "plain.onnx", example)  # the user's model keeps the sparse weights
    assert max(res.max_diff.values()) <= 1e-4
    for name, d in sm.mst.densities().items():
        assert res.metadata["densities"][name] == pytest.approx(d)
    assert len(res.sparse_initializers) > 0
    mlp = MLP()
    out = mst_compile.export_onnx(mlp, tmp_path / "mlp.onnx", torch.randn(4, 16))  # (batch, features): batch dynamic only
    assert out.inputs == ["x"] and out.outputs == ["output"]


def test_bad_input(tmp_path, monkeypatch):
    model, sm, example = _build("tiny_gpt")
    with pytest.raises(mst_compile.MstCompileError, match="is a folder"):
        mst_compile.export_onnx(sm, tmp_path, example)
    with pytest.raises(ValueError, match="needs the module returned by mst_compile.sparsify"):
        mst_compile.export_onnx(model, tmp_path / "m.onnx", example, attention="sparse")
    with pytest.raises(ValueError, match="needs example_inputs"):
        mst_compile.export_onnx(sm, tmp_path / "m.onnx", None)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(mst_compile.MstCompileError, match="onnxruntime-gpu"):
            mst_compile.export_onnx(sm, tmp_path / "m.onnx", example, provider="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(ImportError, match=r"mst-compile\[onnx\]"):
        mst_compile.export_onnx(sm, tmp_path / "m.onnx", example)
    res = mst_compile.export_onnx(sm, tmp_path / "m.onnx", example, validate=False)  # still writes without it
    assert res.max_diff is None and res.path.is_file()


# -- mstc export RUN_DIR ------------------------------------------------------------------------
RUN_MODEL = f'''
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2] / "examples")!r})
import torch
from tiny_gpt import GPT
import mst_compile

def model():
    return GPT(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)

def config():
    return mst_compile.MSTConfig(update_interval=2, warmup_end=0.5, ultra_end=0.75, stride=4,
                                 attention_phases=("ultra",))

def train_config():
    return {{"steps": 8, "batch_size": 4, "block_size": 32, "eval_iters": 1, "eval_interval": 4, "log_interval": 1,
            "checkpoint_interval": 2, "lr": 3e-3}}

def data():
    def get_batch(split, index):
        return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(index % 2**31))
    return get_batch
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished MST run (restoration: dense attention) and one stopped in the ultra phase (sparse)."""
    from mst_compile.train.loop import TrainingInterrupted, train

    d = tmp_path_factory.mktemp("runs")
    (d / "tiny.py").write_text(RUN_MODEL)
    train(d / "tiny.py", out=d / "done", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(d / "tiny.py", out=d / "ultra", progress=False, stop_at=5)
    return d


def test_cli_export_finished_run(runs, tmp_path):
    from click.testing import CliRunner

    from mst_compile.cli import main
    from mst_compile.modelfile import load_model_file

    out = tmp_path / "new" / "model.onnx"
    r = CliRunner().invoke(main, ["export", str(runs / "done"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "attention dense" in r.output and "matches PyTorch" in r.output
    meta = read_metadata(out)
    ck = torch.load(runs / "done" / "checkpoints" / "last.pt", weights_only=True)
    masks = ck["mst"]["mst"]["masks"]
    assert meta["densities"] == {n: int(m.sum()) / m.numel() for n, m in masks.items()}
    assert meta["run"]["step"] == 8 and meta["train_config"]["batch_size"] == 4 and meta["config"]["stride"] == 4
    assert set(meta["attention"].values()) == {"dense"}
    # the oracle: the user's model with the checkpoint's weights, no mst_compile involved
    model = load_model_file(runs / "tiny.py").model()
    model.load_state_dict(ck["model"])
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        np.testing.assert_allclose(_ort(out, x), model.eval()(x).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_export_run_stopped_in_ultra_phase_keeps_sparse_attention(runs):
    from click.testing import CliRunner

    from mst_compile.cli import main

    r = CliRunner().invoke(main, ["export", str(runs / "ultra")])
    assert r.exit_code == 0, r.output
    meta = read_metadata(runs / "ultra" / "model.onnx")
    sites = list(meta["attention"])  # the defaults' attention_depth=0.5: HSA in the first half, dense causal after
    assert [meta["attention"][s] for s in sites] == ["sparse", "dense"] and meta["stride"][sites[0]] == 4
    assert meta["run"]["step"] == 5 and meta["density"] < 0.5
    r = CliRunner().invoke(main, ["export", str(runs / "ultra"), "-o", str(runs / "dense.onnx"), "--attention", "dense",
                                  "--no-validate", "--dense-initializers"])
    assert r.exit_code == 0, r.output
    assert set(read_metadata(runs / "dense.onnx")["attention"].values()) == {"dense"}
    assert read_metadata(runs / "dense.onnx")["sparse_initializers"] == []


def test_cli_export_bad_input(runs, tmp_path, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from mst_compile.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(main, ["export", str(tmp_path)])
    assert r.exit_code == 2 and "not a run folder (no config.toml)" in r.output
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(runs / "done" / "config.toml", empty / "config.toml")
    r = runner.invoke(main, ["export", str(empty)])
    assert r.exit_code == 2 and "has no checkpoint" in r.output and "last.pt" in r.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = runner.invoke(main, ["export", str(runs / "done"), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "pip install 'mst-compile[onnx]'" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_export_leaks_no_warnings_of_torch_or_onnx(tmp_path):
    import warnings

    sm = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(), total_steps=10)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mst_compile.export_onnx(sm, tmp_path / "m.onnx", example_inputs=(torch.zeros(1, 16, dtype=torch.long),))
    assert [str(w.message)[:120] for w in seen] == []
