"""`mstc train` on every file in examples/ and on model files with other call conventions."""
import json
import math
from pathlib import Path

import pytest
from _train_models import write
from click.testing import CliRunner

from mst_compile.cli import main

ROOT = Path(__file__).resolve().parents[2]
# the model files (the scripts own_loop.py and hf_trainer.py have their own tests: runtime/test_handle_own_loop, integrations/test_transformers)
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if "\ndef model(" in p.read_text())
FAST = ["--steps", "2", "--batch-size", "2", "--block-size", "16", "--eval-iters", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))


def _train(model_file, out, *extra):
    r = CliRunner().invoke(main, ["train", str(model_file), "--out", str(out), *FAST, *extra])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    return s


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} >= {"tiny_gpt.py", "addition_gpt.py", "hf_gpt2.py", "hf_llama.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_trains_through_the_cli(example, tmp_path):
    s = _train(example, tmp_path / "run")
    assert s["mode"] == "mst" and s["final_densities"]  # its weights were found and rewritten


@pytest.mark.slow
def test_hf_example_dense_baseline(tmp_path):
    s = _train(ROOT / "examples" / "hf_llama.py", tmp_path / "run", "--dense")
    assert s["mode"] == "dense" and s["reduction"] == 1.0


# models whose forward takes the tokens as `input_ids=` only, returns an output object or a tuple,
# or needs a second argument that a batch() hook supplies; all captured from a batch-1 example
CONVENTIONS = '''
import torch, torch.nn as nn
from transformers.modeling_outputs import CausalLMOutput

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.out = nn.Linear(16, 256)

    def forward(self, *, input_ids, attention_mask=None):
        return CausalLMOutput(logits=self.out(self.emb(input_ids)))

class Pair(M):
    def forward(self, idx, targets):
        logits = self.out(self.emb(idx))  # (B, T, vocab)
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

def model():
    return {kind}()

def example_inputs():
    return {example}
'''


@pytest.mark.parametrize("kind,example,hook", [
    ("M", "{'input_ids': torch.zeros(1, 1, dtype=torch.long)}", ""),
    ("Pair", "(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))",
     "\ndef batch(tokens):\n    return (tokens, tokens)\n"),
])
def test_other_call_conventions_train(kind, example, hook, tmp_path):
    f = write(tmp_path, "conv.py", CONVENTIONS.format(kind=kind, example=example) + hook)
    mst = _train(f, tmp_path / "run")
    dense = _train(f, tmp_path / "dense", "--dense")  # the dense baseline counts through the same inputs
    assert dense["dense_flops"] == pytest.approx(mst["dense_flops"]) and dense["mst_flops"] == pytest.approx(dense["dense_flops"])


def test_forward_needing_an_argument_is_one_line_exit_1(tmp_path):
    f = write(tmp_path, "needs.py", CONVENTIONS.format(kind="Pair", example="None"))
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(tmp_path / "run"), *FAST])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "Pair.forward needs the argument 'targets'" in r.output and "batch(tokens)" in r.output
    assert "example_inputs()" in r.output
    assert not (tmp_path / "run").exists()
