"""sparsify(model): capture + linear pass parity against the dense model and a dense-mask reference."""
import copy
import warnings

import pytest
import torch
from _models import (
    MLP,
    FunctionalLinear,
    NoLinear,
    SpellingsLM,
    StockAttention,
    TiedLM,
    Unrewritable,
    hf_gpt2,
    hf_llama,
    tiny_gpt,
)

import mst_compile
from mst_compile.capture import capture
from mst_compile.passes.linear import rewrite_linear


def _ids(vocab, b=2, t=12):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


CASES = {
    "mlp": (MLP, lambda: torch.randn(5, 16), None, "fx"),
    "functional": (FunctionalLinear, lambda: torch.randn(3, 7, 12), None, "fx"),
    "tied": (TiedLM, lambda: _ids(50), None, "fx"),
    "spellings": (SpellingsLM, lambda: _ids(40), None, "fx"),
    "stock_attention": (StockAttention, lambda: _ids(40), None, "export"),
    "tiny_gpt": (tiny_gpt, lambda: _ids(64), None, "fx"),
    "tiny_gpt_manual": (lambda: tiny_gpt(flash=False), lambda: _ids(64), None, "export"),
    "hf_gpt2": (hf_gpt2, lambda: _ids(64), "input_ids", "export"),
    "hf_llama": (hf_llama, lambda: _ids(64), "input_ids", "export"),
}


def _build(case):
    make, inp, kw, how = CASES[case]
    torch.manual_seed(0)
    model = make()
    x = inp()
    example = {kw: x} if kw else (x,)
    sm = mst_compile.sparsify(model, example_inputs=example)
    assert sm.mst.capture == how

    def run(mod, inputs):
        out = mod(**{kw: inputs}) if kw else mod(inputs)
        return out.logits if hasattr(out, "logits") else out

    return model, sm, x, run


@pytest.mark.parametrize("case", list(CASES))
def test_dense_parity_and_masked_reference(case):
    model, sm, x, run = _build(case)
    torch.testing.assert_close(run(sm, x), run(model, x))
    n_weights = len([e for e in sm.mst.sites if e.kind == "linear"])
    assert n_weights >= 2

    sm.mst.set_sparsity(0.9)
    masks = sm.mst.masks()
    params = sm.mst.parameters()
    for name, p in params.items():
        assert torch.all(p[~masks[name]] == 0), f"{name}: masked weights must be exactly zero"
    # reference: an independent dense copy whose weights are explicitly multiplied by the masks
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    y = run(sm, x)
    y_ref = run(ref, x)
    torch.testing.assert_close(y, y_ref)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in params.items():
        expected = ref_params[name].grad * masks[name]
        torch.testing.assert_close(p.grad, expected, msg=f"weight gradient of {name}")
        assert torch.all(p.grad[~masks[name]] == 0)


@pytest.mark.parametrize("case", ["tiny_gpt", "hf_gpt2"])
def test_other_sequence_lengths_and_training_in_place(case):
    model, sm, x, run = _build(case)
    longer = torch.randint(0, 64, (3, 20))
    torch.testing.assert_close(run(sm, longer), run(model, longer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    run(sm, longer).square().mean().backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "training sm must train the user's model in place"
    assert all(p is q for p, q in zip(sm.mst.parameters().values(), [dict(model.named_parameters())[n] for n in sm.mst.parameters()]))


def test_tied_weight_has_one_mask_and_masked_gradient():
    model, sm, x, run = _build("tied")
    names = [e.name for e in sm.mst.sites]
    assert "emb.weight" in names and "lm_head.weight" not in names
    sm.mst.set_sparsity(0.8)
    run(sm, x).sum().backward()
    mask = sm.mst.masks()["emb.weight"]
    assert torch.all(model.emb.weight.grad[~mask] == 0), "the embedding use must not leak gradient into masked weights"
    assert torch.all(model.emb.weight[~mask] == 0)


def test_set_sparsity_keeps_largest_magnitudes_and_exact_budget():
    model, sm, x, run = _build("tiny_gpt")
    dense = {n: p.detach().abs().clone() for n, p in sm.mst.parameters().items()}
    sm.mst.set_sparsity(0.9)
    total = sum(p.numel() for p in sm.mst.parameters().values())
    assert sum(int(m.sum()) for m in sm.mst.masks().values()) == round(0.1 * total)
    assert sm.mst.density() == pytest.approx(0.1, abs=1 / total)
    for n, m in sm.mst.masks().items():
        kept, dropped = dense[n][m], dense[n][~m]
        assert kept.min() >= dropped.max()


def test_filter_fn_excludes_sites():
    model = tiny_gpt()
    seen = []

    def keep(module, fqn):
        seen.append((type(module).__name__, fqn))
        return "mlp" not in fqn

    sm = mst_compile.sparsify(model, filter_fn=keep)
    names = [e.name for e in sm.mst.sites if e.kind == "linear"]
    assert names and not any("mlp" in n for n in names)
    assert any("mlp" in s for s, _ in sm.mst.skipped)
    assert ("Linear", "h.0.attn.c_attn") in seen


def test_model_without_linear_warns_and_is_unchanged():
    model = NoLinear()
    with pytest.warns(UserWarning, match="matched nothing"):
        sm = mst_compile.sparsify(model)
    x = torch.randn(2, 8)
    assert sm.mst.sites == [] and sm.mst.density() == 1.0
    torch.testing.assert_close(sm(x), model(x))
    with pytest.raises(AttributeError, match=r"sm\.mst\.plan was renamed sm\.mst\.sites.*mst_compile\.plan"):
        _ = sm.mst.plan


def test_hf_model_still_generates_with_sparse_weights():
    model, sm, x, run = _build("hf_gpt2")
    sm.mst.set_sparsity(0.9)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.all(dict(model.named_parameters())[name][~sm.mst.masks()[name]] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="torch.nn.Module, got str"):
        mst_compile.sparsify("model")
    with pytest.raises(mst_compile.CaptureError, match="pass example_inputs"):
        mst_compile.sparsify(hf_gpt2())
    with pytest.raises(ValueError, match="sparsity=1.0"):
        mst_compile.sparsify(MLP(), {"sparsity": 1.0})
    with pytest.raises(ValueError, match="distribution='normal'"):
        mst_compile.sparsify(MLP(), mst_compile.MSTConfig.from_dict({"distribution": "er"}).replace(distribution="normal"))
    sm = mst_compile.sparsify(MLP())
    with pytest.raises(ValueError, match="set_sparsity"):
        sm.mst.set_sparsity(1.2)


SPELLING_USES = {"w_t": 2, "w_T": 1, "w_io": 1, "w_lin": 1, "e_vd": 1, "e_de": 1, "e_perm": 1, "mm": 1, "conv": 1,
                 "bmm": 1, "left": 1, "wte.weight": 1}


@pytest.mark.parametrize("how", ["fx", "export"])
def test_every_matmul_spelling_is_one_masked_site_per_parameter(how):
    torch.manual_seed(0)
    model, x = SpellingsLM(), _ids(40)
    gm, got = capture(model, (x,), fx=how == "fx")
    assert got == how
    res = rewrite_linear(gm)
    assert {s.name: s.uses for s in res.sites} == SPELLING_USES and res.skipped == []
    assert res.other_uses == ["wte.weight"], "the embedding lookup of the tied head shares its mask"
    # no matmul reads a parameter any more: every parameter use is the sparse op or the embedding lookup
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            assert all(u.op == "call_module" or "embedding" in str(u.target) for u in node.users), node.users
    torch.testing.assert_close(gm(x), model(x))


def test_unrewritable_parameter_matmuls_are_listed_with_why():
    sm = mst_compile.sparsify(Unrewritable())
    assert [e.name for e in sm.mst.sites] == ["fc.weight"]
    got = [(name, why.split(" (at ")[0]) for name, why in sm.mst.skipped]
    assert got == [("scaled", "the operand is computed from the parameter, not a view of it"),
                   ("a, b", "both operands are parameters"),
                   ("a, b", "the operand is computed from the parameter, not a view of it"),
                   ("summed", "einsum 'btd,de->bt' does not contract the parameter like a linear layer")]
    assert all(why.endswith("charged dense)") for _, why in sm.mst.skipped)


def test_stock_attention_modules_are_rewritten_or_reported():
    names = {"mha.in_proj_weight", "mha.out_proj.weight", "enc.self_attn.in_proj_weight",
             "enc.self_attn.out_proj.weight", "enc.linear1.weight", "enc.linear2.weight", "wte.weight"}
    sm = mst_compile.sparsify(StockAttention(), example_inputs=(_ids(40),))
    assert sm.mst.capture == "export" and {e.name for e in sm.mst.sites if e.kind == "linear"} == names
    sm.mst.set_sparsity(0.9)
    assert sm.mst.density() == pytest.approx(0.1, abs=1e-3)
    with pytest.warns(UserWarning, match="stay dense and uncounted"):  # torch.fx alone cannot see inside them
        fx_only = mst_compile.sparsify(StockAttention())
    skipped = dict(fx_only.mst.skipped)
    assert set(skipped) == names - {"wte.weight"} and all("pass example_inputs" in w for w in skipped.values())
    assert any("mha.in_proj_weight" in e for e in fx_only.mst.flops.excluded)


@pytest.mark.parametrize("make", [TiedLM, SpellingsLM])
def test_tied_growth_gradient_covers_every_use(make):
    """The dense gradient that ranks growth is d loss / d W over all uses of W (the embedding lookup
    too), checked against autograd of an unmasked copy holding the same masked weights."""
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    vocab = model.emb.num_embeddings if hasattr(model, "emb") else model.wte.num_embeddings
    sm = mst_compile.sparsify(model, {"update_interval": 2, "schedule": [(0, 0.5), (10, 0.5)]}, total_steps=10)
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)  # step 0 -> 1 is not an update; the backward of step 2 forms the dense gradient
    batches = [_ids(vocab), torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(2))]
    sm(batches[0]).square().mean().backward()
    opt.step()
    opt.zero_grad()
    ref.load_state_dict(model.state_dict())  # the masked weights, as plain tensors
    for b in batches:  # two micro-batches: the dense gradient sums over both, like any gradient
        sm(b).square().mean().backward()
        ref(b).square().mean().backward()
    grads = sm.mst._scheduler._dense_grads()
    ref_params = dict(ref.named_parameters())
    tied = "emb.weight" if hasattr(model, "emb") else "wte.weight"
    assert sm.mst.masks()[tied].float().mean() < 1
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_params[name].grad, msg=f"dense gradient of {name}")
