"""sparsify(..., blocks=...): one rewritten GraphModule per block in the model's own module tree, which
trains exactly as whole-model capture does and takes per-block wrappers (checkpointing, torch.compile)."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from _models import MLP, tiny_gpt
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.utils.checkpoint import checkpoint

import mst_compile
from mst_compile.errors import CaptureError
from mst_compile.export.finalize import finalize
from mst_compile.ops.attention import HybridSparseAttention
from mst_compile.ops.sparse_linear import SparseWeight

T = 40  # updates every 5 steps: 7 topology updates, through warm-up, ultra and restoration
CFG = mst_compile.MSTConfig(update_interval=5, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25, ultra_end=0.75,
                            drop_fraction=(0.5, 0.3, 0.2), stride=4, attention_depth=1.0)


def _pair(make=tiny_gpt, **kw):
    """(the per-block copy's model, whole-model sm, per-block sm) of one model's two identical copies."""
    torch.manual_seed(0)
    model = make()
    twin = copy.deepcopy(model)
    return twin, mst_compile.sparsify(model, CFG, total_steps=T, seed=3, blocks=None, **kw), \
        mst_compile.sparsify(twin, CFG, total_steps=T, seed=3, blocks="h", **kw)


def _batches(n, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 17), generator=g) for _ in range(n)]


def _train(sm, batches, model=None):
    """AdamW steps on next-token loss through ``model`` (default: ``sm``); the losses."""
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    run, losses = model or sm, []
    for b in batches:
        logits = run(b[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_the_module_tree_and_names_are_the_models():
    model, whole, sm = _pair()
    assert isinstance(sm.h, nn.ModuleList) and sm.mst.capture == "fx"
    for i in range(2):
        block = sm.get_submodule(f"h.{i}")
        assert isinstance(block, torch.fx.GraphModule) and block is sm.h[i]
        ops = {type(m) for m in block.modules()}
        assert SparseWeight in ops and HybridSparseAttention in ops
        called = {n.target.split(".")[0] for n in block.graph.nodes if n.op == "call_module"}
        assert {"mst_sites", "mst_attn"} <= called
    top = [n.target for n in sm.graph.nodes if n.op == "call_module"]
    assert "h.0" in top and "h.1" in top and "mst_sites.wte__weight" in top  # the tied head, at the top level
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in sm.named_parameters()] == names == [n for n, _ in whole.named_parameters()]
    assert all(p is q for p, q in zip(sm.parameters(), model.parameters()))
    assert [(s.name, s.kind, s.uses) for s in sm.mst.sites] == [(s.name, s.kind, s.uses) for s in whole.mst.sites]
    assert sm.mst.sites[8].name == "wte.weight" and sm.mst.sites[8].uses == 1
    sws = sm.mst.sparse_weights()
    assert sm.h[1].mst_sites.attn__c_attn__weight is sws["h.1.attn.c_attn.weight"]
    assert sws["h.1.attn.c_attn.weight"].name == "h.1.attn.c_attn.weight"
    assert list(sm.mst.attention_modules()) == ["h.0.attn", "h.1.attn"]
    assert sm.mst.skipped == whole.mst.skipped == []
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(sm(x), whole(x), rtol=0, atol=0)


def test_the_default_finds_the_block_list_and_captures_per_block():
    torch.manual_seed(0)
    model = tiny_gpt()
    sm = mst_compile.sparsify(model, CFG)
    assert isinstance(sm.get_submodule("h.1"), torch.fx.GraphModule) and sm.meta["mst_blocks"] == "h"
    whole = mst_compile.sparsify(model, CFG, blocks=None)
    assert "mst_blocks" not in whole.meta and whole.meta["mst_whole_why"] == "blocks=None"
    assert [s.name for s in sm.mst.sites] == [s.name for s in whole.mst.sites]


def test_trains_identically_to_whole_model_capture():
    """Same losses, bitwise the same masks after 7 topology updates, the same FLOP ledger."""
    _, whole, sm = _pair()
    batches = _batches(T)
    a, b = _train(whole, batches), _train(sm, batches)
    assert whole.mst.last_update["step"] == sm.mst.last_update["step"] == 35
    assert a == pytest.approx(b, abs=1e-6, rel=0)
    for (n, m), (k, mb) in zip(whole.mst.masks().items(), sm.mst.masks().items()):
        assert n == k and torch.equal(m, mb), n
    assert whole.mst.density() < 1.0
    assert sm.mst.flops.as_dict() == whole.mst.flops.as_dict()
    assert sm.mst.last_update == whole.mst.last_update


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class CrossTied(nn.Module):
    """Weights shared between the top level and the blocks: the embedding IS block 0's fc weight (a
    lookup, so a use outside the sparse op) and the head IS block 1's (a sparse op in two pieces)."""

    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(d, d)
        self.h = nn.ModuleList([_Block(d) for _ in range(2)])
        self.emb.weight = self.h[0].fc.weight
        self.head = nn.Linear(d, d, bias=False)
        self.head.weight = self.h[1].fc.weight

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.h:
            x = b(x)
        return self.head(x)


def test_a_weight_shared_across_pieces_is_one_site():
    _, whole, sm = _pair(CrossTied)
    assert [(s.name, s.uses) for s in sm.mst.sites] == [(s.name, s.uses) for s in whole.mst.sites]
    assert [s.name for s in sm.mst.sites] == ["emb.weight", "h.1.fc.weight"]
    shared = sm.mst.sparse_weights()["h.1.fc.weight"]
    assert sm.h[1].mst_sites.fc__weight is shared and sm.mst_sites.head__weight is shared
    assert len(sm.mst._hooks) == len(whole.mst._hooks) == 1  # the lookup's use of emb.weight is masked too
    batches = _batches(12, vocab=16)
    assert _train(whole, batches) == pytest.approx(_train(sm, batches), abs=1e-6, rel=0)
    for n, m in whole.mst.masks().items():
        assert torch.equal(m, sm.mst.masks()[n]), n


class _MaskedAttention(nn.Module):
    """Hand-written attention whose causal mask is built from the input's length."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln, self.qkv, self.proj, self.heads = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, scale=1.0):
        B, T, C = x.size()
        q, k, v = self.qkv(self.ln(x)).split(C, dim=2)
        q, k, v = [t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v)]
        att = (q @ k.transpose(-2, -1)) * 0.5
        att = att.masked_fill(x.new_ones(T, T).tril() == 0, float("-inf"))
        x = x + self.proj((F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C))
        return (x + self.mlp(x)) * scale


class MaskedLM(nn.Module):
    def __init__(self, vocab=64, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([_MaskedAttention(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.h:
            x = b(x, scale=1.0)  # a keyword: each block's mask is evaluated on its inputs bound by name
        return self.head(x)


def test_masks_and_filter_fn_see_the_full_names():
    """The hand-written attention's mask is evaluated on each block's own inputs; filter_fn sees full names."""
    keep = lambda module, fqn: fqn != "h.1.mlp.0"  # noqa: E731
    x = torch.randint(0, 64, (2, 16))
    _, whole, sm = _pair(MaskedLM, example_inputs=(x,), filter_fn=keep)
    assert [s.name for s in sm.mst.sites] == [s.name for s in whole.mst.sites]
    assert list(sm.mst.attention_modules()) == list(whole.mst.attention_modules()) == ["h.0", "h.1"]  # by the block
    assert "h.1.mlp.0.weight" not in sm.mst.parameters()
    assert sm.mst.skipped == whole.mst.skipped == [("h.1.mlp.0.weight", "excluded by filter_fn; charged dense")]
    batches = _batches(6)
    assert _train(whole, batches) == pytest.approx(_train(sm, batches), abs=1e-6, rel=0)
    assert sm.mst.flops.as_dict() == whole.mst.flops.as_dict()


@pytest.mark.parametrize("how", ["checkpoint", "apply_activation_checkpointing"])
def test_per_block_activation_checkpointing(how):
    """Each block under activation checkpointing: the same losses, gradients and masks."""
    _, whole, sm = _pair()
    if how == "checkpoint":
        for block in sm.h:
            block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(block.forward)
    else:  # torch's wrapper, as FSDP users apply it
        blocks = set(sm.h)
        apply_activation_checkpointing(sm, check_fn=lambda m: m in blocks)
        assert type(sm.h[0]).__name__ == "CheckpointWrapper"
    assert _train(whole, _batches(12)) == pytest.approx(_train(sm, _batches(12)), abs=1e-6, rel=0)
    for n, m in whole.mst.masks().items():
        assert torch.equal(m, sm.mst.masks()[n]), n
    b = _batches(1, seed=1)[0]
    for s in (whole, sm):
        F.cross_entropy(s(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
    for (n, p), (_, q) in zip(whole.named_parameters(), sm.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=n)


def test_per_block_torch_compile():
    _, whole, sm = _pair()
    torch._dynamo.reset()
    for block in sm.h:
        block.compile(backend="eager")
    assert _train(whole, _batches(6)) == pytest.approx(_train(sm, _batches(6)), abs=1e-6, rel=0)
    assert sm.mst.flops.as_dict() == whole.mst.flops.as_dict()


def test_state_dicts_use_the_models_names_and_load_across_captures():
    model, whole, sm = _pair()
    assert list(sm.state_dict()) == list(model.state_dict()) == list(whole.state_dict())
    _train(sm, _batches(12))
    weights, state = copy.deepcopy(sm.state_dict()), sm.mst.state_dict()
    x = _batches(1, seed=2)[0][:, :-1]
    for blocks in ("h", None):  # a per-block checkpoint resumes per block, or whole-model
        torch.manual_seed(1)
        fresh = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=T, seed=3, blocks=blocks)
        fresh.load_state_dict(weights)
        fresh.mst.load_state_dict(state)
        assert fresh.mst.step_count == 12
        assert all(torch.equal(m, sm.mst.masks()[n]) for n, m in fresh.mst.masks().items())
        torch.testing.assert_close(fresh(x), sm(x), rtol=0, atol=0)


@pytest.mark.parametrize("attention", [None, "dense", "local"])
def test_finalize_of_a_per_block_module_equals_whole_model_finalize(attention):
    """Trained to the same point, the per-block and whole-model sm finalize to plain modules that agree
    with each other and with sm, keep the model's names and hold no mst op."""
    model, whole, sm = _pair()
    batches = _batches(22)  # into the ultra phase: sparse masks and HSA
    _train(whole, batches)
    _train(sm, batches)
    x = _batches(1, seed=5)[0][:, :-1]
    a, b = finalize(whole, attention=attention), finalize(sm, attention=attention)
    assert isinstance(b.h, nn.ModuleList) and all(isinstance(blk, torch.fx.GraphModule) for blk in b.h)
    assert [n for n, _ in b.named_parameters()] == [n for n, _ in model.named_parameters()]
    mst_ops = (SparseWeight, HybridSparseAttention)
    assert not any(isinstance(m, mst_ops) for blk in b.h for m in blk.modules())
    for gm in (b, *b.h):
        assert not any(n.op == "call_module" and n.target.startswith(("mst_sites", "mst_attn")) for n in gm.graph.nodes)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    if attention is None:  # the patterns sm runs now: the finalized module computes what sm computes
        with torch.no_grad():
            torch.testing.assert_close(b(x), sm(x), rtol=1e-5, atol=1e-5)
    masks = sm.mst.masks()
    assert any(n.startswith("h.") for n in masks)
    for name, m in masks.items():  # the masks folded in: every masked weight is zero in the plain module
        assert not b.get_parameter(name)[~m.bool()].any(), name


class TwoStacks(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.enc = nn.ModuleList([_Block(d)])
        self.dec = nn.ModuleList([_Block(d)])

    def forward(self, x):
        return self.dec[0](self.enc[0](x))


class Branchy(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.h = nn.ModuleList([_Block(d)])

    def forward(self, x):
        return self.h[0](x) if x.sum() > 0 else x


class DataDependentBlock(_Block):
    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


class Untraceable(Branchy):
    def __init__(self, d=8):
        super().__init__(d)
        self.h = nn.ModuleList([DataDependentBlock(d)])

    def forward(self, x):
        return self.h[0](x)


class _StockBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mha, self.fc = nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x + self.mha(x, x, x, need_weights=False)[0])


class StockBlocks(nn.Module):
    """Blocks around nn.MultiheadAttention, which torch.fx calls as a whole: torch.export sees inside."""

    def __init__(self, d=8):
        super().__init__()
        self.h = nn.ModuleList([_StockBlock(d) for _ in range(2)])

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return x


class ReachesIn(Branchy):
    def forward(self, x):
        return self.h[0](x) @ self.h[0].fc.weight


@pytest.mark.parametrize("make, blocks, error, match", [
    (tiny_gpt, "nope", ValueError, r"blocks='nope': GPT has no submodule 'nope'; pass the dotted path"),
    (tiny_gpt, "ln_f", ValueError, r"blocks='ln_f' is a LayerNorm, not an nn.ModuleList of blocks"),
    (tiny_gpt, 3, TypeError, r"blocks must be None, 'auto' or the dotted path of an nn.ModuleList, got int"),
    (Branchy, "h", CaptureError, r"cannot capture Branchy with its blocks 'h' as leaves.*use blocks=None"),
    (Untraceable, "h", CaptureError, r"cannot capture block 'h.0' \(DataDependentBlock\).*: pass example_inputs \(torch.export then "
                                         r"captures it per block\) or use blocks=None"),
    (ReachesIn, "h", CaptureError, r"reads 'h.0.fc.weight' inside block 'h.0' instead of calling the block"),
])
def test_bad_blocks_are_refused_in_one_line(make, blocks, error, match):
    with pytest.raises(error, match=match) as e:
        mst_compile.sparsify(make(), blocks=blocks)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make, why", [
    (MLP, r"^blocks='auto' found no nn.ModuleList of same-class blocks that hold linear layers in MLP$"),
    (TwoStacks, r"^blocks='auto' found several block lists \(enc, dec\) in TwoStacks$"),
    (ReachesIn, r"^ReachesIn's forward reads 'h.0.fc.weight' inside block 'h.0' instead of calling the block"),
])
def test_the_default_captures_whole_what_it_cannot_capture_per_block(make, why):
    """Whole-model capture as blocks=None gives it (same sites, same outputs), and the reason is kept."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, 5, 8) if make is not MLP else torch.randn(3, MLP().fc1.in_features)
    sm, whole = mst_compile.sparsify(model, example_inputs=(x,)), mst_compile.sparsify(model, example_inputs=(x,), blocks=None)
    assert "mst_blocks" not in sm.meta and "\n" not in sm.meta["mst_whole_why"]
    assert re.search(why, sm.meta["mst_whole_why"]), sm.meta["mst_whole_why"]
    assert [s.name for s in sm.mst.sites] == [s.name for s in whole.mst.sites] and sm.mst.capture == whole.mst.capture
    torch.testing.assert_close(sm(x), whole(x), rtol=0, atol=0)


def test_a_per_block_module_exports_to_onnx_and_validates(tmp_path):
    pytest.importorskip("onnxruntime")
    from mst_compile.export.onnx import export_onnx

    _, _, sm = _pair()
    _train(sm, _batches(22))  # ultra phase: sparse masks, HSA
    x = _batches(1, seed=5)[0][:, :-1]
    r = export_onnx(sm, tmp_path / "m.onnx", example_inputs=(x,))  # validates against sm in onnxruntime
    assert set(r.metadata["attention"].values()) == {"sparse"} and r.metadata["density"] < 0.5
    assert r.max_diff["output"] < 1e-4
