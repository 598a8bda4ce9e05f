"""tiny_gpt's model trained on its own data: byte strings of additions like "417+68=485\\n".

`mstc train examples/addition_gpt.py` shows the `data()` hook: instead of the built-in corpus, the
trainer asks `get_batch(split, index)` for each batch. A batch depends only on `index` (the trainer
derives it from the seed and the step), so runs are reproducible and resume exactly.
"""
import numpy as np
import torch
from tiny_gpt import GPT  # mstc puts this file's folder on sys.path while importing it

BLOCK = 64


def model():
    return GPT(vocab_size=256, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64)


def example_inputs():
    return (torch.randint(0, 256, (2, BLOCK)),)


def train_config():
    return {"steps": 300, "batch_size": 16, "block_size": BLOCK, "lr": 2e-3, "eval_iters": 4}


def _sums(rng, n_chars: int) -> bytes:
    out = b""
    while len(out) < n_chars:
        a, b = rng.integers(0, 1000, size=2)
        out += f"{a}+{b}={a + b}\n".encode()
    return out


def data():
    def get_batch(split: str, index: int):
        # val draws from a disjoint seed space, so it never repeats a train batch
        rng = np.random.default_rng([index, 1 if split == "val" else 0])
        rows = [np.frombuffer(_sums(rng, BLOCK + 1)[: BLOCK + 1], dtype=np.uint8) for _ in range(16)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1): the trainer shifts it into (x, y)

    return get_batch
