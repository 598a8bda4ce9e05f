"""sparsify(model): capture + linear pass parity against the dense model and a dense-mask reference."""
import copy
import warnings

import pytest
import torch

import mst_compile
from _models import MLP, FunctionalLinear, NoLinear, TiedLM, hf_gpt2, hf_llama, tiny_gpt


def _ids(vocab, b=2, t=12):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


CASES = {
    "mlp": (MLP, lambda: torch.randn(5, 16), None, "fx"),
    "functional": (FunctionalLinear, lambda: torch.randn(3, 7, 12), None, "fx"),
    "tied": (TiedLM, lambda: _ids(50), None, "fx"),
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
    n_weights = len([e for e in sm.mst.plan if e.kind == "linear"])
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
    names = [e.name for e in sm.mst.plan]
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
    names = [e.name for e in sm.mst.plan if e.kind == "linear"]
    assert names and not any("mlp" in n for n in names)
    assert any("mlp" in s for s, _ in sm.mst.skipped)
    assert ("Linear", "h.0.attn.c_attn") in seen


def test_model_without_linear_warns_and_is_unchanged():
    model = NoLinear()
    with pytest.warns(UserWarning, match="matched nothing"):
        sm = mst_compile.sparsify(model)
    x = torch.randn(2, 8)
    assert sm.mst.plan == [] and sm.mst.density() == 1.0
    torch.testing.assert_close(sm(x), model(x))


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


@pytest.mark.slow
def test_torch_compile_trains_one_step():
    model, sm, x, run = _build("tiny_gpt")
    sm.mst.set_sparsity(0.8)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    compiled = torch.compile(sm)
    loss = compiled(x).square().mean()
    loss.backward()
    opt.step()
    for n, p in sm.mst.parameters().items():
        assert torch.all(p[~sm.mst.masks()[n]] == 0)
    torch.testing.assert_close(compiled(x), sm(x))
