"""Small models shared by the tests (all built from configs: nothing is downloaded)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


class SpellingsLM(nn.Module):
    """A tied LM with no attention whose weights are used in every matmul spelling the linear pass
    rewrites; its head is the nanoGPT variant ``h @ wte.weight.T``."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def w(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.3)

        self.d = d
        self.wte = nn.Embedding(vocab, d)
        self.w_t, self.w_T, self.w_io, self.w_lin = w(d, d), w(d, d), w(d, 2 * d), w(2 * d, d)
        self.e_vd, self.e_de, self.e_perm = w(d, d), w(d, d), w(d, d)
        self.mm, self.conv, self.conv_b, self.bmm, self.left = w(d, d), w(d, d), w(d), w(d, d), w(d, d)

    def forward(self, idx):
        h = self.wte(idx)  # (B, T, d)
        B, T, d = h.shape
        h = torch.tanh(h @ self.w_t.t()) + torch.matmul(h, self.w_T.T)  # x @ Wᵀ two ways
        h = torch.tanh(F.linear(h @ self.w_io, self.w_lin.T))  # x @ W (in×out), F.linear on Wᵀ: (B, T, d)
        h = h + F.linear(h, self.w_t)  # a second use of w_t, another spelling
        h = torch.tanh(torch.einsum("btd,vd->btv", h, self.e_vd)) + torch.einsum("btd,de->bte", h, self.e_de)
        h = h + torch.einsum("vd,btd->bvt", self.e_perm, h).transpose(1, 2)  # parameter first, output permuted
        flat = h.reshape(B * T, d)  # (B·T, d)
        flat = torch.mm(flat, self.mm.view(self.d, self.d)) + torch.addmm(self.conv_b, flat, self.conv)
        h = torch.tanh(flat.reshape(B, T, d))
        h = h + torch.bmm(h, self.bmm.unsqueeze(0).expand(B, -1, -1))  # bmm with a broadcast parameter
        h = h + (self.left @ h.transpose(1, 2)).transpose(1, 2)  # parameter on the left
        return h @ self.wte.weight.T  # (B, T, vocab)


class Unrewritable(nn.Module):
    """Parameter matmuls the linear pass cannot put in ``x @ Wᵀ`` form (listed in ``skipped``)."""

    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.scaled = nn.Parameter(torch.randn(d, d))
        self.a, self.b = nn.Parameter(torch.randn(d, d)), nn.Parameter(torch.randn(d, d))
        self.summed = nn.Parameter(torch.randn(d, d))

    def forward(self, x):
        h = self.fc(x)  # (B, T, d)
        h = h @ (2.0 * self.scaled)  # a weight computed from the parameter
        h = h + h @ (self.a @ self.b)  # two parameter operands
        return torch.einsum("btd,de->bt", h, self.summed)  # sums over the output features too


class StockAttention(nn.Module):
    """Stock nn.MultiheadAttention and nn.TransformerEncoderLayer, which torch.fx calls as a whole."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, idx):
        h = self.wte(idx)  # (B, T, d)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        return self.enc(h) @ self.wte.weight.T  # (B, T, vocab)


def transposed_head_gpt(vocab_size=64):
    """tiny GPT whose tied head is written ``h @ wte.weight.T`` (a common nanoGPT variant)."""

    class TransposedHead(load_example("tiny_gpt").GPT):
        def forward(self, idx):
            pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
            x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # (B, T, vocab)

    gpt = TransposedHead(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    del gpt.lm_head
    return gpt


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (kernels that must never build a T×T mask)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out
