"""mstc train on the data forms beyond text, the vocabulary check before any forward, and the hint for
an unquoted glob."""
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch.nn as nn
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.modelfile import input_embedding

SHORT = ["--steps", "6", "--update-interval", "1", "--quiet"]

# the forward fails loudly: a check that runs only after a forward would report this instead
NO_FORWARD = """
class _NoForward(GPT):
    def forward(self, idx):
        raise RuntimeError("the forward ran")

_model = model

def model():
    m = _model()
    m.__class__ = _NoForward
    return m
"""

# two embeddings, neither tied to the head, and no block_size: setup cannot tell which one the ids index
UNTIED = '''
import torch, torch.nn as nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(64, 16)
        self.pos = nn.Embedding(48, 16)
        self.out = nn.Linear(16, 64)

    def forward(self, idx):
        return self.out(self.tok(idx) + self.pos(torch.arange(idx.size(1))))

def model():
    return M()

def train_config():
    return {"batch_size": 2, "block_size": 16}
'''


def _nanogpt(folder, vocab: int, n: int = 6000):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, n).astype(np.uint16).tofile(folder / "train.bin")
    rng.integers(0, vocab, n // 5).astype(np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)
    return folder


def _one_line_error(r, code=2) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.mark.slow  # about 5 s: a whole run, capture included
def test_train_on_a_nanogpt_folder(tmp_path):
    data = _nanogpt(tmp_path / "ng", vocab=50)
    f = write(tmp_path, "tiny.py", TINY)
    r = CliRunner().invoke(main, ["train", str(f), "--data", str(data), "--out", str(tmp_path / "run"), "--lr", "0.01", *SHORT])
    assert r.exit_code == 0, r.output
    assert f'data = "{data}"' in (tmp_path / "run/config.toml").read_text()
    s = json.loads((tmp_path / "run/summary.json").read_text())
    assert s["val_loss"] < np.log(256)  # the ids of the folder, not bytes: 50 distinct tokens


def test_ids_beyond_the_embedding_are_refused_before_any_forward(tmp_path):
    run = CliRunner()
    f = write(tmp_path, "small.py", TINY.replace("vocab_size=256", "vocab_size=64") + NO_FORWARD)
    (tmp_path / "a.txt").write_text("Only ASCII letters here, all above 64.\n" * 40)
    msg = _one_line_error(run.invoke(main, ["train", str(f), "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run"), *SHORT]))
    largest = max(open(tmp_path / "a.txt", "rb").read())
    assert f"the data's largest token id is {largest} ({tmp_path / 'a.txt'}, tokenized by bytes)" in msg
    assert "input embedding wte has 64 rows (ids 0-63)" in msg and f"at least {largest + 1}" in msg
    data = _nanogpt(tmp_path / "ng", vocab=300)
    msg = _one_line_error(run.invoke(main, ["train", str(f), "--data", str(data), "--out", str(tmp_path / "run"), *SHORT]))
    assert f"largest token id is 299 ({data}, read as uint16 ids)" in msg and "64 rows" in msg
    assert not (tmp_path / "run").exists()  # refused before the run folder was written


def test_an_embedding_found_only_by_the_forward_is_checked_before_its_lookup(tmp_path):
    f = write(tmp_path, "untied.py", UNTIED)
    (tmp_path / "a.txt").write_text("abc" * 400)
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(f), "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "r1"), *SHORT]))
    assert "largest token id is 99" in msg and "input embedding tok has 64 rows" in msg and "IndexError" not in msg
    hooked = write(tmp_path, "hooked.py", UNTIED + "\nimport torch\ndef data():\n    return lambda split, i: torch.full((2, 17), 70)\n")
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(hooked), "--out", str(tmp_path / "r2"), *SHORT]))
    assert "the first batch holds token id 70" in msg and "tok has 64 rows" in msg


def test_negative_ids_and_a_head_smaller_than_the_data_are_refused(tmp_path):
    neg = write(tmp_path, "neg.py", TINY + "\nimport numpy as np\ndef data():\n    return np.where(np.arange(2000) == 7, -1, np.arange(2000) % 200)\n")
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(neg), "--out", str(tmp_path / "r1"), *SHORT]))
    assert f"the data holds the negative token id -1 ({neg}: data()); token ids start at 0" in msg
    small_head = write(tmp_path, "head.py", UNTIED.replace("nn.Embedding(64, 16)", "nn.Embedding(256, 16)"))
    (tmp_path / "a.txt").write_text("abc" * 400)
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(small_head), "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "r2"), *SHORT]))
    assert "largest token id is 99" in msg and "the model predicts only 64 classes" in msg


def test_input_embedding_is_found_without_a_forward():
    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.embed_tokens = nn.Embedding(10, 4), nn.Embedding(99, 4)

        def get_input_embeddings(self):
            return self.embed_tokens

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe, self.head = nn.Embedding(70, 4), nn.Embedding(10, 4), nn.Linear(4, 70)
            self.head.weight = self.wte.weight

    class Positions(nn.Module):
        block_size = 10

        def __init__(self):
            super().__init__()
            self.wpe, self.wte = nn.Embedding(10, 4), nn.Embedding(80, 4)

    assert input_embedding(HF()) == ("embed_tokens", 99)
    assert input_embedding(nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 30))) == ("0", 30)
    assert input_embedding(Tied()) == ("wte", 70)
    assert input_embedding(Positions()) == ("wte", 80)
    assert input_embedding(nn.ModuleDict({"a": nn.Embedding(5, 4), "b": nn.Embedding(6, 4)})) is None  # left to the forward


def test_an_unquoted_glob_gets_a_hint(tmp_path):
    f = write(tmp_path, "tiny.py", TINY)
    paths = [str(tmp_path / f"doc{i}.txt") for i in range(3)]  # what the shell makes of --data docs/*.txt
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(f), "--data", *paths, "--steps", "4"]))
    assert "the shell expanded an unquoted glob" in msg and f"--data '{tmp_path}/*.txt'" in msg
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(f), str(tmp_path / "x.py")]))
    assert "unexpected extra argument(s)" in msg


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the data extra (datasets)")
def test_train_on_records_with_a_text_field(tmp_path):
    f = write(tmp_path, "tiny.py", TINY)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "body": f"note {i}: the quick brown fox. " * 8}) + "\n" for i in range(60)))
    msg = _one_line_error(CliRunner().invoke(main, ["train", str(f), "--data", str(docs), *SHORT]))
    assert "has no column 'text' (columns: id, body); pass --text-field NAME" in msg
    r = CliRunner().invoke(main, ["train", str(f), "--data", str(docs), "--text-field", "body", "--out", str(tmp_path / "run"), *SHORT])
    assert r.exit_code == 0, r.output
    assert 'text_field = "body"' in (tmp_path / "run/config.toml").read_text()
