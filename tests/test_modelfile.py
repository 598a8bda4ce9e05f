"""modelfile.py: loading a model.py and its hooks, how token ids reach a forward (each refusal one line),
the model's output read as logits, and the facts read off a model without a forward."""
import hashlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import TiedLM, tiny_gpt
from torch import nn

from mst_compile.errors import CaptureError, ModelInputError, MstCompileError
from mst_compile.modelfile import (
    build_model,
    check_unchanged,
    file_sha256,
    input_embedding,
    lm_loss,
    load_model_file,
    logits_of,
    max_sequence_length,
    parameter_count,
)

FILE = """
import torch.nn as nn
from neighbour import WIDTH

class Pos(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, WIDTH)
    def forward(self, idx, temperature=1.0):
        return self.emb(idx) / temperature

class KwOnly(nn.Module):
    def forward(self, *, input_ids, attention_mask=None):
        return input_ids

class Needs(nn.Module):
    def forward(self, idx, mask):
        return idx

def model():
    return Pos()
"""


@pytest.fixture
def mf(tmp_path):
    (tmp_path / "neighbour.py").write_text("WIDTH = 3\n")
    (tmp_path / "model.py").write_text(FILE)
    return load_model_file(tmp_path / "model.py")


def test_load_and_hooks(mf, tmp_path):
    m = mf.model()
    assert type(m).__name__ == "Pos" and mf.example_inputs() is None and mf.config() is None  # neighbours import
    with pytest.raises(MstCompileError, match=r"model.py does not define data\(\)"):
        mf.call("data")
    mf.namespace.model = lambda: 3
    with pytest.raises(MstCompileError, match=r"model\(\) returned int, expected a torch.nn.Module"):
        mf.model()
    mf.namespace.config = lambda: 1 / 0
    with pytest.raises(MstCompileError, match=r"config\(\) raised ZeroDivisionError: division by zero"):
        mf.config()
    with pytest.raises(MstCompileError, match="does not exist: pass the path of a .py file"):
        load_model_file(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(MstCompileError, match=r"does not define model\(\): add `def model"):
        load_model_file(tmp_path / "bad.py")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(MstCompileError, match=r"^importing .*broken.py raised ModuleNotFoundError"):
        load_model_file(tmp_path / "broken.py")


def test_inputs_for_each_calling_convention(mf):
    t = torch.zeros(2, 3, dtype=torch.long)
    ns = mf.namespace
    assert mf.inputs_for(ns.Pos())(t)[0] is t
    assert mf.inputs_for(ns.KwOnly())(t)["input_ids"] is t
    with pytest.raises(ModelInputError, match=r"Needs.forward needs the argument 'mask'.*\{'idx': tokens, 'mask': \.\.\.\}"):
        mf.inputs_for(ns.Needs())
    ns.batch = lambda tokens: {"idx": tokens, "mask": None}
    assert mf.inputs_for(ns.Needs())(t) == {"idx": t, "mask": None}  # batch(tokens) decides
    assert mf.capture_inputs(ns.Needs(), t)["idx"] is t


def test_capture_errors_are_worded_for_the_file(mf):
    e = mf.capture_error(CaptureError("boom", "torch.export failed: boom", "cache"))
    assert str(e).endswith("{'input_ids': tokens, 'use_cache': False}") and e.kind == "cache"
    e = mf.capture_error(CaptureError("x", "torch.export failed: x", "export"))
    assert "mstc passed it token ids as its first argument or input_ids=" in str(e)


def test_logits_and_loss():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    assert logits_of(logits) is logits and logits_of((logits, None)) is logits
    assert logits_of({"logits": logits}) is logits
    assert logits_of(type("Out", (), {"logits": logits})()) is logits
    assert lm_loss(logits, y).item() == pytest.approx(F.cross_entropy(logits.reshape(6, 5), y.reshape(6)).item())


def test_facts_read_off_a_model():
    gpt = tiny_gpt()
    assert max_sequence_length(gpt) == 32 and max_sequence_length(nn.Linear(2, 2)) is None
    name, rows = input_embedding(gpt)  # the tied token embedding, not the position one
    assert rows == 64 and "wte" in name
    tied = TiedLM()
    assert input_embedding(tied) == ("emb", 50)
    assert parameter_count(tied) == sum(p.numel() for p in tied.parameters())  # the tied weight counted once
    assert parameter_count(tied) == 50 * 16 + 16 * 16 + 16


def test_build_model_from_a_module_and_a_file(mf):
    m = nn.Linear(2, 2)
    built, name, inputs, f = build_model(m)
    assert built is m and name == "Linear" and f is None and inputs("t") == ("t",)
    built, name, inputs, f = build_model(str(mf.path))
    assert type(built).__name__ == "Pos" and name == str(mf.path) and f.path == mf.path
    with pytest.raises(MstCompileError, match="HF config .*missing.json does not exist"):
        build_model(mf.path.parent / "missing.json")


def test_a_changed_model_file_warns(mf, tmp_path):
    digest = hashlib.sha256(mf.path.read_bytes()).hexdigest()
    assert file_sha256(mf.path) == digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_unchanged(mf.path, digest, tmp_path)
        check_unchanged(mf.path, None, tmp_path)
    mf.path.write_text(FILE + "\n# edited\n")
    with pytest.warns(UserWarning, match=f"changed since the run in {tmp_path} was trained with it \\(sha256 {digest[:12]}"):
        check_unchanged(mf.path, digest, tmp_path)
