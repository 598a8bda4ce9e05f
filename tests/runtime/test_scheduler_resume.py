"""Exact resume: 2N straight steps == N steps, save, fresh objects, load, N steps (bitwise, CPU)."""
import io

import pytest
import torch
import torch.nn.functional as F
from _models import MLP, load_example, tiny_gpt

import mst_compile

N = 8
CFG = mst_compile.MSTConfig(update_interval=3, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25, ultra_end=0.75)
RUN = dict(total_steps=2 * N, seed=11)


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(2 * N)]


def _fresh(init_seed, attach=True):
    torch.manual_seed(init_seed)  # a fresh process would initialise differently: loading must not care
    model = tiny_gpt()
    sm = mst_compile.sparsify(model, CFG, **RUN)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2, weight_decay=0.1)
    if attach:
        sm.mst.attach(opt)
    return model, sm, opt


def _train(sm, opt, batches):
    for b in batches:
        logits = sm(b[:, :-1])  # (B, T, vocab)
        F.cross_entropy(logits.reshape(-1, 64), b[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("attach_before_load", [True, False])
def test_resume_is_bitwise_identical(attach_before_load):
    data = _data()
    model_a, sm_a, opt_a = _fresh(0)
    _train(sm_a, opt_a, data)

    model_b, sm_b, opt_b = _fresh(0)
    _train(sm_b, opt_b, data[:N])
    assert sm_b.mst.phase == "ultra" and sm_b.mst.last_update is not None and sm_b.mst.last_update["grown_random"] > 0
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "mst": sm_b.mst.state_dict()}, buf)
    del model_b, sm_b, opt_b
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_c, sm_c, opt_c = _fresh(123, attach=attach_before_load)
    model_c.load_state_dict(ckpt["model"])
    sm_c.mst.load_state_dict(ckpt["mst"])
    if not attach_before_load:
        sm_c.mst.attach(opt_c)
    opt_c.load_state_dict(ckpt["opt"])
    assert sm_c.mst.step_count == N and sm_c.mst.phase == "ultra"
    assert list(sm_c.mst.attention_patterns().values()) == [CFG.attention, "dense"]  # attention_depth=0.5
    _train(sm_c, opt_c, data[N:])

    for n, m in sm_a.mst.masks().items():
        assert torch.equal(m, sm_c.mst.masks()[n]), f"mask of {n} differs after resume"
    params_c = dict(model_c.named_parameters())
    for n, p in model_a.named_parameters():
        assert torch.equal(p, params_c[n]), f"weight {n} differs after resume"
    state_a, state_c = opt_a.state_dict()["state"], opt_c.state_dict()["state"]
    for i in state_a:
        for k in state_a[i]:
            assert torch.equal(torch.as_tensor(state_a[i][k]), torch.as_tensor(state_c[i][k]))
    assert sm_a.mst.step_count == sm_c.mst.step_count == 2 * N
    assert sm_a.mst.last_update == sm_c.mst.last_update
    assert sm_a.mst.flops.as_dict() == sm_c.mst.flops.as_dict()


def test_state_dict_is_plain_and_complete():
    model, sm, opt = _fresh(0)
    _train(sm, opt, _data()[:4])
    sd = sm.mst.state_dict()
    assert sd["step"] == 4 and set(sd["masks"]) == set(sm.mst.parameters())
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in sd["masks"].values())
    assert isinstance(sd["generator"], torch.Tensor)
    buf = io.BytesIO()
    torch.save(sd, buf)  # plain tensors and Python values only
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["ledger"] == sd["ledger"]


def test_mismatched_checkpoint_is_a_clear_error():
    _, sm, opt = _fresh(0)
    sd = sm.mst.state_dict()
    other = mst_compile.sparsify(load_example("tiny_gpt").GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=48), CFG, **RUN)
    want = r"mask of weight 'h.0.attn.c_attn.weight' has shape \(96, 32\) in the checkpoint, but the model's weight has shape \(144, 48\).*more"
    with pytest.raises(mst_compile.CheckpointError, match=want):
        other.mst.load_state_dict(sd)
    mlp = mst_compile.sparsify(MLP(), CFG, **RUN)
    with pytest.raises(mst_compile.CheckpointError, match=r"missing masks for \['fc1.weight', 'fc2.weight'\]"):
        mlp.mst.load_state_dict(sd)
    with pytest.raises(mst_compile.CheckpointError, match="expected a dict from sm.mst.state_dict"):
        sm.mst.load_state_dict({"model": {}})
    before = {n: m.clone() for n, m in sm.mst.masks().items()}
    bad = dict(sd, masks={**sd["masks"], "h.0.mlp.0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(mst_compile.CheckpointError, match="h.0.mlp.0.weight"):
        sm.mst.load_state_dict(bad)
    assert all(torch.equal(m, before[n]) for n, m in sm.mst.masks().items()), "a failed load changes nothing"


def test_loading_under_a_different_config_warns():
    _, sm, opt = _fresh(0)
    sd = sm.mst.state_dict()
    longer = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=4 * N, seed=11)
    with pytest.warns(UserWarning, match="total_steps: 16 -> 32"):
        longer.mst.load_state_dict(sd)
