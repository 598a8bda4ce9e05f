"""The shared constants: one definition of each name, and one rule for a blocked mask entry."""
import math
import subprocess
import sys

import pytest
import torch

from mst_compile import constants
from mst_compile.config import ATTENTION_PATTERNS, MSTConfig
from mst_compile.ops.attention import PATTERNS, HybridSparseAttention, allowed_keys
from mst_compile.passes._mask_eval import allowed_set


def test_one_definition_of_each_name():
    assert PATTERNS is constants.ATTENTION_PATTERNS is ATTENTION_PATTERNS
    assert MSTConfig().attention in constants.ATTENTION_PATTERNS
    assert [constants.default_stride(T) for T in (1, 7, 8, 1024)] == [1, 1, 1, 128]


def test_constants_import_no_torch():
    code = "import sys, mst_compile.constants, mst_compile.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blocked_entries_read_alike_in_the_pass_and_at_run_time(dtype):
    # -inf, the dtype's minimum (Hugging Face) and -1e4 (older GPT-2 code) all block a key
    for v in (-math.inf, torch.finfo(dtype).min, -1e4):
        assert constants.blocks(v)
        mask = torch.tensor([0.0, v], dtype=dtype)
        assert allowed_keys(mask).tolist() == [True, False]
        assert allowed_set(mask, "add").tolist() == [True, False]
    assert not constants.blocks(-1.0) and not constants.blocks(0.0)
    assert isinstance(allowed_set(torch.tensor([0.0, -1.0], dtype=dtype), "add"), str)  # a bias, not a mask


@pytest.mark.parametrize("fill", [-1e4, float("-inf"), torch.finfo(torch.float32).min])
def test_padding_mask_at_minus_1e4_falls_back_to_masked_dense(fill):
    # the run-time check once took only entries below finfo.min / 2 as blocked, so a -1e4 padding
    # mask ran the sparse kernel as if the padded keys were there
    T = 8
    site = HybridSparseAttention("a", "sparse", stride=2)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    no_pad = torch.zeros(T, T).masked_fill(~causal, fill)
    assert not site.runs_masked_dense(T, no_pad)
    padded = no_pad.clone()
    padded[:, 0] = fill  # the first key is padding
    assert site.runs_masked_dense(T, padded)
