"""A small Hugging Face GPT-2 built from a config (no download), byte vocabulary.

`mstc inspect examples/hf_gpt2.py` or `mstc train examples/hf_gpt2.py`. GPT-2 is not symbolically
traceable, so mst_compile captures it with torch.export from `example_inputs()`.
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

BLOCK = 128


def model():
    cfg = GPT2Config(
        vocab_size=256, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # torch.export captures in eval mode: no dropout
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def example_inputs():
    return {"input_ids": torch.randint(0, 256, (2, BLOCK))}


def train_config():
    return {"steps": 1000}
