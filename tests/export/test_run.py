"""A run's model back in PyTorch as it trained (``mst_compile.load``), and the edge cases of
``mstc export``: a maximum length the model names its own way, lengths beyond it, a file that fails
validation, and a run that stopped before its first checkpoint."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import mst_compile
from mst_compile.cli import main
from mst_compile.modelfile import load_model_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# 64 positions, trained on blocks of 32, with HSA in every phase in the first of its two blocks (the defaults'
# attention_depth=0.5) and the default stride
MODEL = f'''
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
import torch
from tiny_gpt import GPT
import mst_compile


class ContextGPT(GPT):  # names its maximum length "context", which no convention knows
    def __init__(self):
        super().__init__(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)
        self.context = self.__dict__.pop("block_size")


def model():
    return ContextGPT()

def config():
    return mst_compile.MSTConfig(update_interval=1, warmup_end=0.25, ultra_end=0.75)

def train_config():
    return {{"steps": 8, "batch_size": 4, "block_size": 32, "eval_iters": 1, "eval_interval": 4, "log_interval": 1,
            "checkpoint_interval": 4, "lr": 3e-3}}

def data():
    def get_batch(split, index):
        return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(index % 2**31))
    return get_batch
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_env):
    from mst_compile.train.loop import train

    d = tmp_path_factory.mktemp("load")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    (d / "model.py").write_text(MODEL)
    train(d / "model.py", out=d / "run", progress=False)
    return d


def _one_line(r) -> str:
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def _oracle_sdpa(stride: int, sparse_blocks: int = 1, n_layer: int = 2):
    """Causal SDPA restricted to the sparse pattern (i - j < l or (i - j) % l == 0) by a dense mask in the first
    ``sparse_blocks`` of every ``n_layer`` calls (the blocks run in order), dense causal in the others."""
    sdpa = F.scaled_dot_product_attention
    calls = []

    def attend(q, k, v, is_causal=False, **kw):
        calls.append(1)
        if (len(calls) - 1) % n_layer >= sparse_blocks:
            return sdpa(q, k, v, is_causal=True, **kw)
        d = torch.arange(q.shape[-2])[:, None] - torch.arange(k.shape[-2])[None, :]  # (T, T) i - j
        return sdpa(q, k, v, attn_mask=(d >= 0) & ((d < stride) | (d % stride == 0)), **kw)

    return attend


def test_load_runs_the_model_as_trained(runs, monkeypatch):
    run = runs / "run"
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    loaded = mst_compile.load(run)
    assert not loaded.training
    # the oracle: the model file's model with the checkpoint's weights, its attention masked to the
    # sparse pattern at the stride it trained with (blocks of 32: 32 / 8 = 4)
    model = load_model_file(runs / "model.py").model().eval()
    model.load_state_dict(ck["model"])
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids)
        monkeypatch.setattr(F, "scaled_dot_product_attention", _oracle_sdpa(4))
        want = model(ids)  # (2, 64, 256)
        monkeypatch.undo()
        assert (dense - want).abs().max() > 1e-3, "dense attention would not pass the checks below"
        for T in (32, 20, 64):  # the trained length, a prefix, and past it (up to the model's 64 positions)
            torch.testing.assert_close(loaded(ids[:, :T]), want[:, :T], rtol=0, atol=1e-4)


def test_load_is_public_and_import_mst_compile_stays_light():
    code = ("import sys, mst_compile; light = 'torch' not in sys.modules; load = mst_compile.load; "
            "print(light, 'load' in mst_compile.__all__, load.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)})
    assert out.stdout.split() == ["True", "True", "mst_compile.export.run"]


def test_load_of_a_dense_run_is_the_model(runs, tmp_path):
    r = CliRunner().invoke(main, ["train", str(runs / "model.py"), "--dense", "--out", str(tmp_path / "dense"), "--quiet"])
    assert r.exit_code == 0, r.output
    loaded = mst_compile.load(tmp_path / "dense")
    assert type(loaded).__name__ == "ContextGPT"
    ck = torch.load(tmp_path / "dense" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(p, ck["model"][n]) for n, p in loaded.state_dict().items())


def test_lengths_beyond_the_maximum_the_model_names_its_own_way_are_one_line(runs, tmp_path):
    out = tmp_path / "m.onnx"
    msg = _one_line(CliRunner().invoke(main, ["export", str(runs / "run"), "-o", str(out), "--check-lengths", "16,128"]))
    assert "sequence length 128 is beyond the maximum sequence length 64 of model.py's model" in msg and not out.exists()


@pytest.mark.slow
def test_export_records_the_maximum_it_found(runs, tmp_path):
    from mst_compile.export import read_metadata

    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(main, ["export", str(runs / "run"), "-o", str(out), "--no-validate"])
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["max_sequence_length"] == 64
    assert meta["max_sequence_length_note"] == "found by running model.py's model: it runs at 64 tokens, not at 65"


def test_the_probe_records_an_unknown_maximum():
    from mst_compile.export.run import _probed_limit
    from mst_compile.export.validate import probe_limit

    calls = []
    assert probe_limit(lambda T: calls.append(T) or T <= 100, 32, 256) == 100 and calls[:3] == [33, 66, 132]
    assert probe_limit(lambda T: T <= 32, 32, 256) == 32
    assert probe_limit(lambda T: True, 32, 256) is None
    no_positions = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))  # runs at any length
    mf = SimpleNamespace(path=Path("bag.py"))
    limit, note = _probed_limit(mf, no_positions, (torch.zeros(2, 8, dtype=torch.long),), 8, [100])
    assert limit is None and note == "unknown: bag.py's model names no maximum and ran at every length probed up to 100"


@pytest.mark.slow
def test_a_file_that_fails_validation_is_not_left(tmp_path, monkeypatch):
    from _models import MLP

    from mst_compile.export import onnx as onnx_export

    real = onnx_export.reference

    def off_by_one(*args, **kw):  # PyTorch's side disagrees with whatever was exported
        run, io = real(*args, **kw)
        return (lambda *xs: [y + 1 for y in run(*xs)]), io

    monkeypatch.setattr(onnx_export, "reference", off_by_one)
    out = tmp_path / "m.onnx"
    with pytest.raises(mst_compile.ExportValidationError, match=f"^{re.escape(str(out))}: onnxruntime"):
        mst_compile.export_onnx(MLP(), out, torch.randn(4, 16))
    assert list(tmp_path.iterdir()) == []
    out.write_text("an earlier export")
    with pytest.raises(mst_compile.ExportValidationError):
        mst_compile.export_onnx(MLP(), out, torch.randn(4, 16))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and out.read_text() == "an earlier export"


def test_the_advice_for_a_run_without_checkpoint_works(runs, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(runs / "run" / "config.toml", killed / "config.toml")  # as a run killed before step 4 leaves it
    msg = _one_line(CliRunner().invoke(main, ["export", str(killed)]))
    assert "stopped before its first checkpoint" in msg
    assert _one_line(CliRunner().invoke(main, ["train", str(runs / "model.py"), "--resume", str(killed)])) == msg
    model, config = re.search(r"mstc train (\S+) --config (\S+) --out NEW_RUN_DIR$", msg.strip()).groups()
    r = CliRunner().invoke(main, ["train", model, "--config", config, "--out", str(tmp_path / "again"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(str(tmp_path / "again"))
    again = torch.load(tmp_path / "again" / "checkpoints" / "last.pt", weights_only=True)
    first = torch.load(runs / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert again["step"] == first["step"] == 8  # the same run, started again
    assert all(torch.equal(again["model"][n], p) for n, p in first["model"].items())
