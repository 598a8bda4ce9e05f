"""A small Hugging Face LLaMA (grouped-query attention) built from a config, byte vocabulary."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BLOCK = 128


def model():
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=BLOCK,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def example_inputs():
    return {"input_ids": torch.randint(0, 256, (2, BLOCK))}


def train_config():
    return {"steps": 1000}
