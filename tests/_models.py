"""Small models shared by the tests (all built from configs: nothing is downloaded)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=64, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class FunctionalLinear(nn.Module):
    """Calls F.linear on its own parameters, and a second time on the same weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 12) * 0.2)
        self.b = nn.Parameter(torch.zeros(24))
        self.w2 = nn.Parameter(torch.randn(12, 24) * 0.2)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w, self.b))
        return F.linear(h, self.w2) + F.linear(torch.tanh(F.linear(h, self.w2)), self.w, None).sum(-1, keepdim=True)


class TiedLM(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        return self.lm_head(torch.relu(self.proj(self.emb(idx))))


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return torch.relu(self.norm(x))


def tiny_gpt(**kw):
    return load_example("tiny_gpt").GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        return LlamaForCausalLM(cfg)
