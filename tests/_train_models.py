"""Model files (source text) for the trainer tests: tiny byte-level GPTs that train in seconds."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = f'''
import sys
sys.path.insert(0, {str(ROOT / "examples")!r})
from tiny_gpt import GPT
import mst_compile

def model():
    return GPT(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)

def config():
    # HSA in the ultra phase only: the tests see each phase's attention switch
    return mst_compile.MSTConfig(update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4,
                                 attention_phases=("ultra",))

def train_config():
    return {{"steps": 24, "batch_size": 4, "block_size": 32, "eval_iters": 2, "eval_interval": 8, "log_interval": 1,
            "checkpoint_interval": 8, "lr": 3e-3}}
'''

# same interface, different shapes: its checkpoints must not load into TINY
WIDER = TINY.replace("n_embd=32", "n_embd=48")

# get_batch poisons the weights with NaN at its 6th training batch: the trainer reads one batch before
# training to check the model, so step 5 is the first with a NaN loss
NAN_AT_6 = TINY + '''
import torch
_calls = {"train": 0}
_models = []
_orig = model

def model():
    m = _orig()
    m.register_buffer("poison", torch.zeros(()))
    _models.append(m)
    return m

def data():
    def get_batch(split, index):
        if split == "train":
            _calls["train"] += 1
            if _calls["train"] >= 6:
                for m in _models:
                    m.lm_head.weight.data.fill_(float("nan"))
        g = torch.Generator().manual_seed(index % 2**31)
        return torch.randint(0, 256, (4, 33), generator=g)
    return get_batch
'''

# a data() hook that takes 0.15 s per training batch, so a signal reliably lands mid-run
SLOW = TINY + '''
import time
import torch

def data():
    tokens = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0))

    def get_batch(split, index):
        if split == "train":
            time.sleep(0.15)
        g = torch.Generator().manual_seed(index % 2**31)
        starts = torch.randint(0, len(tokens) - 33, (4,), generator=g).tolist()
        return torch.stack([tokens[s : s + 33] for s in starts])  # (B, T + 1)

    return get_batch
'''

# data-dependent Python control flow on a tensor value: it runs eagerly, but neither fx nor export can
# capture it
UNCAPTURABLE = '''
import torch, torch.nn as nn

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 8)
        self.out = nn.Linear(8, 256)

    def forward(self, idx):
        h = self.emb(idx)
        if float(h.sum()) > -1e30:  # always true when run, but a Python bool of a tensor value
            h = h * 2
        return self.out(h)

def model():
    return M()
'''


def write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.write_text(text)
    return p
