"""Per-block capture through torch.export (capture_split.py): the exported graph cut at the blocks gives
the model's module tree and trains exactly as whole-model capture does, for models fx cannot capture."""
import copy

import pytest
import torch
import torch.nn.functional as F
from _models import hf_gpt2, hf_llama, tiny_gpt
from test_capture_blocks import CFG, StockBlocks, T, _batches, _StockBlock
from torch import nn

import mst_compile
from mst_compile import capture_blocks
from mst_compile.errors import CaptureError


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _train(sm, batches):
    """AdamW steps on next-token loss; the losses."""
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    losses = []
    for b in batches:
        loss = F.cross_entropy(_logits(sm(b[:, :-1])).flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _pair(make, example, **kw):
    """(per-block sm, whole-model sm) of two identical copies of ``make()``."""
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    return (mst_compile.sparsify(twin, CFG, total_steps=T, seed=3, example_inputs=example, **kw),
            mst_compile.sparsify(model, CFG, total_steps=T, seed=3, example_inputs=example, blocks=None))


@pytest.mark.parametrize("make, path, attn", [(hf_gpt2, "transformer.h", "attn"), (hf_llama, "model.layers", "self_attn")],
                         ids=["gpt2", "llama"])
def test_hf_models_are_captured_per_block_and_train_as_whole(make, path, attn):
    """Hugging Face transformers v5 models, which fx cannot trace, per block through torch.export: the model's
    module tree and names, the whole capture's sites in its order, the same losses and masks through all phases."""
    pytest.importorskip("transformers")
    ids = _batches(1)[0][:, :-1]
    sm, whole = _pair(make, {"input_ids": ids})
    assert sm.mst.capture == whole.mst.capture == "export" and sm.meta["mst_blocks"] == path
    blocks = sm.get_submodule(path)
    assert all(isinstance(b, torch.fx.GraphModule) for b in blocks) and len(blocks) == 2
    assert list(sm.state_dict()) == list(whole.state_dict())
    assert [(s.name, s.kind, s.uses) for s in sm.mst.sites] == [(s.name, s.kind, s.uses) for s in whole.mst.sites]
    assert list(sm.mst.attention_modules()) == list(whole.mst.attention_modules()) == [f"{path}.{i}.{attn}" for i in (0, 1)]
    for i, block in enumerate(blocks):  # each block holds its own weights, and only them
        names = [n for n, _ in block.named_parameters()]
        assert names and all(sm.get_parameter(f"{path}.{i}.{n}") is p for n, p in block.named_parameters())
    batches = _batches(T)
    assert _train(sm, batches) == pytest.approx(_train(whole, batches), abs=1e-6, rel=0)
    assert sm.mst.last_update == whole.mst.last_update and sm.mst.last_update["step"] == 35
    for (n, m), (k, w) in zip(sm.mst.masks().items(), whole.mst.masks().items()):
        assert n == k and torch.equal(m, w), n
    assert sm.mst.flops.as_dict() == whole.mst.flops.as_dict()


def test_an_fx_traceable_model_cut_from_its_export_trains_as_fx_captures_it(monkeypatch):
    """The export route on a model fx captures too, against an independent reference: whole-model fx capture."""
    def no_fx(*a, **k):
        raise CaptureError("sparsify: fx is off for this test")

    monkeypatch.setattr(capture_blocks, "_capture_fx", no_fx)
    x = _batches(1)[0][:, :-1]
    sm, _ = _pair(tiny_gpt, (x,))
    torch.manual_seed(0)
    whole = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=T, seed=3, blocks=None)
    assert sm.mst.capture == "export" and whole.mst.capture == "fx" and isinstance(sm.h[1], torch.fx.GraphModule)
    assert [n for n, _ in sm.named_parameters()] == [n for n, _ in whole.named_parameters()]
    assert [(s.name, s.uses) for s in sm.mst.sites] == [(s.name, s.uses) for s in whole.mst.sites]
    batches = _batches(T)
    assert _train(sm, batches) == pytest.approx(_train(whole, batches), abs=1e-5, rel=0)
    for (n, m), (k, w) in zip(sm.mst.masks().items(), whole.mst.masks().items()):
        assert n == k and torch.equal(m, w), n


def test_blocks_with_modules_fx_calls_whole_are_captured_per_block():
    """nn.MultiheadAttention: fx sees no matmul inside it, torch.export does."""
    x = torch.randn(3, 5, 8)
    sm, whole = _pair(StockBlocks, (x,))
    assert sm.meta["mst_blocks"] == "h" and sm.mst.capture == "export"
    assert [s.name for s in sm.mst.sites] == [s.name for s in whole.mst.sites]
    assert "h.0.mha.in_proj_weight" in [s.name for s in sm.mst.sites]
    torch.testing.assert_close(sm(x), whole(x), rtol=0, atol=0)


class Reused(nn.Module):
    """Block h.0 runs twice: its ops are two runs of the exported graph."""

    def __init__(self, d=8):
        super().__init__()
        self.h = nn.ModuleList([_StockBlock(d) for _ in range(2)])

    def forward(self, x):
        return self.h[0](self.h[1](self.h[0](x)))


class Reaching(StockBlocks):
    def forward(self, x):
        return super().forward(x) @ self.h[1].fc.weight


@pytest.mark.parametrize("make, match", [
    (Reused, r"block 'h.0' of Reused does not run as one piece in its exported graph \(op '\w+' of h.1 runs between its "
             r"ops.*use blocks=None"),
    (Reaching, r"Reaching's forward reads 'h.1.fc.weight' inside block 'h.1' instead of calling the block.*use blocks=None"),
])
def test_what_cannot_be_cut_is_refused_in_one_line_and_the_default_captures_it_whole(make, match):
    x = torch.randn(2, 3, 8)
    with pytest.raises(CaptureError, match=match) as e:
        mst_compile.sparsify(make(), example_inputs=(x,), blocks="h")
    assert "\n" not in str(e.value)
    sm = mst_compile.sparsify(make(), example_inputs=(x,))
    assert "mst_blocks" not in sm.meta and sm.meta["mst_whole_why"].startswith(str(e.value).removeprefix("sparsify: ")[:40])


@pytest.mark.parametrize("pattern", ["dense", "sparse"])
def test_exported_attention_keeps_the_output_layout_later_views_rely_on(monkeypatch, pattern):
    """tiny_gpt's ``y.transpose(1, 2).contiguous().view(...)``: torch.export drops the .contiguous() that SDPA's
    output layout made a no-op, so the attention op must return that layout (else the view fails)."""
    from mst_compile import api
    from mst_compile.capture import capture

    monkeypatch.setattr(api, "capture", lambda m, ex=None, fx=True: capture(m, ex, fx=False))
    torch.manual_seed(0)
    b = _batches(2)
    sm = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=T, example_inputs=(b[0][:, :-1],), blocks=None)
    assert sm.mst.capture == "export"
    for mod in sm.mst.attention_modules().values():
        mod.set_pattern(pattern)
    sm.train()
    _logits(sm(b[1][:, :-1])).sum().backward()


def test_blocks_cut_from_an_export_take_checkpointing_and_compile():
    """A Hugging Face GPT-2's exported blocks under torch's activation checkpointing wrapper, and compiled one by
    one (Dynamo, eager backend): the losses, masks and ledger of whole-model capture."""
    pytest.importorskip("transformers")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    ids = _batches(1)[0][:, :-1]
    batches = _batches(12)
    sm, whole = _pair(hf_gpt2, {"input_ids": ids})
    blocks = set(sm.transformer.h)
    apply_activation_checkpointing(sm, check_fn=lambda m: m in blocks)
    assert type(sm.transformer.h[0]).__name__ == "CheckpointWrapper"
    want = _train(whole, batches)
    assert _train(sm, batches) == pytest.approx(want, abs=1e-6, rel=0)
    for (n, m), (_, w) in zip(sm.mst.masks().items(), whole.mst.masks().items()):
        assert torch.equal(m, w), n
    sm, _ = _pair(hf_gpt2, {"input_ids": ids})
    torch._dynamo.reset()
    for block in sm.transformer.h:
        block.compile(backend="eager")
    assert _train(sm, batches) == pytest.approx(want, abs=1e-6, rel=0)
    assert sm.mst.flops.as_dict() == whole.mst.flops.as_dict()


def test_an_unforeseen_failure_of_the_cut_falls_back_to_whole_capture(monkeypatch):
    from mst_compile import capture_split

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(capture_split, "_cut", boom)
    x = torch.randn(2, 3, 8)
    sm = mst_compile.sparsify(StockBlocks(), example_inputs=(x,))
    assert "mst_blocks" not in sm.meta and sm.meta["mst_whole_why"] == \
        "cutting StockBlocks's exported graph at its blocks 'h' failed (RuntimeError: boom)"
    with pytest.raises(CaptureError, match=r"failed \(RuntimeError: boom\): use blocks=None"):
        mst_compile.sparsify(StockBlocks(), example_inputs=(x,), blocks="h")
