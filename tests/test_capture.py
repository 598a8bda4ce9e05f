"""capture: a size-1 example does not fix batch or sequence length; calls follow the model's own signature."""
import pytest
import torch
from _models import hf_gpt2, hf_llama, tiny_gpt
from torch import nn

import mst_compile

MODELS = {
    "hf_llama": (hf_llama, "export"),
    "hf_gpt2": (hf_gpt2, "export"),
    "tiny_gpt": (tiny_gpt, "fx"),
    "tiny_gpt_manual": (lambda: tiny_gpt(flash=False), "export"),  # hand-written masked attention
}
SHAPES = [(1, 1), (8, 1), (1, 2), (3, 5), (5, 17), (8, 31)]  # batch 1..8, shorter and longer than the example


def _ids(b, t, seed=0):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("example_shape", [(1, 1), (1, 8)], ids=["1x1", "1x8"])
@pytest.mark.parametrize("case", list(MODELS))
def test_size_one_example_runs_at_every_batch_and_length(case, example_shape):
    make, how = MODELS[case]
    torch.manual_seed(0)
    model = make().eval()
    x = _ids(*example_shape)
    example = {"input_ids": x} if case.startswith("hf") else (x,)
    sm = mst_compile.sparsify(model, example_inputs=example).eval()
    assert sm.mst.capture == how
    assert len(sm.mst.attention_modules()) == 2 and sm.mst.skipped == []  # both attention layers still rewritten
    for b, t in SHAPES:
        ids = _ids(b, t, seed=b * 100 + t)
        torch.testing.assert_close(_logits(sm(ids)), _logits(model(ids)), msg=f"batch {b}, length {t}")
    # and it trains there: the gradient reaches the user's parameters
    _logits(sm(_ids(4, 9))).square().mean().backward()
    assert all(p.grad is not None for p in sm.mst.parameters().values())


def test_exported_module_takes_the_models_own_call_conventions():
    model = hf_llama().eval()
    x = _ids(2, 6)
    want = model(x).logits
    by_keyword = mst_compile.sparsify(model, example_inputs={"input_ids": _ids(1, 1)})
    by_position = mst_compile.sparsify(model, example_inputs=(_ids(1, 1),))
    for sm in (by_keyword, by_position):
        assert sm.mst.capture == "export"
        torch.testing.assert_close(sm(x).logits, want)
        torch.testing.assert_close(sm(input_ids=x).logits, want)
        torch.testing.assert_close(sm(x, attention_mask=None).logits, want)  # an input at its default is dropped
        with pytest.raises(TypeError, match="'attention_mask' was not among them: pass it in example_inputs"):
            sm(x, attention_mask=torch.ones_like(x))
    with pytest.raises(TypeError, match=r"LlamaForCausalLM was captured with inputs \['input_ids'\]; 'tokens' was not"):
        by_keyword(tokens=x)  # taken by the forward's **kwargs, but not a graph input


class OneFeature(nn.Module):
    """Needs its last dim to be 1 (Python control flow on a shape: fx cannot trace it, export can)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-1] != 1:
            raise ValueError(f"expected one feature, got {x.shape[-1]}")
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_dim_that_must_stay_one_stays_one_and_batch_still_varies():
    model = OneFeature()
    sm = mst_compile.sparsify(model, example_inputs=(torch.randn(1, 1),))
    assert sm.mst.capture == "export" and sm.meta["example_inputs"][0].shape == (2, 1)  # batch widened, feature kept
    for b in range(1, 9):
        x = torch.randn(b, 1)
        torch.testing.assert_close(sm(x), model(x))


@pytest.mark.parametrize("case", ["tiny_gpt", "tiny_gpt_manual"])  # the fx path and the torch.export path
def test_a_strided_example_captures_a_module_that_takes_any_layout(case):
    """x = t[:, :-1] is a strided view: torch.export used to turn its strides into a guard, and the
    module then failed on every contiguous batch inside torch's guard code."""
    make, how = MODELS[case]
    torch.manual_seed(0)
    model = make().eval()
    x = _ids(4, 17)[:, :-1]  # (4, 16), strides (17, 1)
    assert not x.is_contiguous()
    sm = mst_compile.sparsify(model, example_inputs={"input_ids": x} if case.startswith("hf") else (x,)).eval()
    assert sm.mst.capture == how
    batches = [x, x.contiguous(), _ids(3, 9), _ids(6, 25)[:, 1:], _ids(1, 5), _ids(9, 2).t()]  # strided, contiguous, transposed
    for ids in batches:
        torch.testing.assert_close(_logits(sm(ids)), _logits(model(ids)), msg=f"shape {tuple(ids.shape)}, strides {ids.stride()}")
