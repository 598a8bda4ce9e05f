"""Hugging Face folders: from_pretrained loads them with the masks folded in and the same logits; a
model trained to the end with sparse attention runs it after loading (forward and generate, with the
KV cache); the CLI writes them."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import hf_gpt2, hf_llama
from click.testing import CliRunner

import mst_compile

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

import mst_compile.integrations.transformers  # noqa: F401  (registers the mst_hsa attention)
from mst_compile.cli import main
from mst_compile.export import export_hf, read_summary

SPARSE = dict(update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.5, final_sparsity=0.5)


def _trained(cfg, steps, build=hf_gpt2, total_steps=6):
    torch.manual_seed(0)
    model = build()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = mst_compile.sparsify(model, cfg, total_steps=total_steps, example_inputs={"input_ids": x})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        b = torch.randint(0, 64, (4, 17), generator=g)
        logits = sm(input_ids=b[:, :-1]).logits  # (B, T, vocab)
        F.cross_entropy(logits.reshape(-1, 64), b[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return model, sm, x


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_round_trip_with_dense_attention_at_the_end(tmp_path):
    cfg = mst_compile.MSTConfig(update_interval=1, attention_phases=("ultra",), warmup_end=0.25, ultra_end=0.5, sparsity=0.9,
                                final_sparsity=0.7, stride=4)
    model, sm, x = _trained(cfg, 7, total_steps=8)  # ends in restoration: sparse weights, dense attention
    assert sm.mst.phase == "restoration" and sm.mst.density() < 0.5
    sm.eval()
    with torch.no_grad():
        want = sm(input_ids=x).logits
    folder = export_hf(model, tmp_path / "hf", sm)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = _load(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    params = dict(loaded.named_parameters())
    for n, m in sm.mst.masks().items():
        assert torch.all(params[n][~m] == 0), f"{n}: masked weights must be stored as zeros"
    s = read_summary(folder)
    assert s["attention_at_end"] == "dense" and "attention_note" not in s and s["masks_folded"]
    assert s["density"] == pytest.approx(sm.mst.density()) and s["step"] == 7 and s["config"]["stride"] == 4
    out = loaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def _greedy(sm, prompt, n):
    """The reference decode: the trained module re-run on the whole sequence for every new token (no cache)."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, sm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.slow
def test_sparse_attention_runs_as_trained_after_reload(tmp_path):
    model, sm, _ = _trained(mst_compile.MSTConfig(stride=4, attention_depth=1.0, **SPARSE), 5, hf_llama)  # grouped-query attention
    assert set(sm.mst.attention_patterns().values()) == {"sparse"}
    sm.eval()
    folder = export_hf(model, tmp_path / "hf", sm)
    config = json.loads((folder / "config.json").read_text())
    assert config["attn_implementation"] == "mst_hsa"
    assert config["mst_attention"] == {"0": {"pattern": "sparse", "stride": 4}, "1": {"pattern": "sparse", "stride": 4}}
    assert read_summary(folder)["attention_at_end"] == "sparse"
    loaded = _load(folder)
    assert loaded.config._attn_implementation == "mst_hsa"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for T in (16, 37):  # the trained length and a longer one
            ids = torch.randint(1, 64, (2, T), generator=g)
            want = sm(input_ids=ids).logits
            torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        assert (dense(input_ids=ids).logits - want).abs().max() > 1e-3, "dense attention would not pass the check above"
        # generate decodes with the KV cache: each new token attends at its absolute position
        prompt = torch.randint(1, 64, (2, 5), generator=g)
        out = loaded.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert torch.equal(out, _greedy(sm, prompt, 20))
        # a left-padded batch: the same tokens for the padded row as for its prompt alone
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt[:1, :2]], 1)
        mask = (padded != 0).long()
        out = loaded.generate(torch.cat([padded, prompt[1:]]), attention_mask=torch.cat([mask, torch.ones(1, 5, dtype=torch.long)]),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[0, 5:], _greedy(sm, prompt[:1, :2], 8)[0, 2:])
        with pytest.raises(mst_compile.MstCompileError, match="static cache"):
            loaded.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")


def test_default_stride_is_the_trained_one(tmp_path):
    model, sm, _ = _trained(mst_compile.MSTConfig(**SPARSE), 5)  # stride T/8 of the running length
    with pytest.raises(mst_compile.MstCompileError, match=r"give the length the model trained at \(block_size=...\)"):
        export_hf(model, tmp_path / "unused", sm)
    folder = export_hf(model, tmp_path / "hf", sm, block_size=16)  # trained on 16 tokens: stride 2
    # the defaults' attention_depth=0.5: HSA in the first of the two layers, dense causal in the second
    assert json.loads((folder / "config.json").read_text())["mst_attention"] == {
        "0": {"pattern": "sparse", "stride": 2}, "1": {"pattern": "dense", "stride": None}}
    loaded = _load(folder)
    sm.eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = sm(input_ids=ids).logits  # (2, 16, 64): every query as in training
        for T in (16, 9):  # a prefix sees what it saw in training, whatever follows it
            torch.testing.assert_close(loaded(input_ids=ids[:, :T]).logits, want[:, :T], rtol=0, atol=1e-4)


def test_a_model_that_bypasses_the_attention_interface_is_refused(tmp_path):
    model, sm, _ = _trained(mst_compile.MSTConfig(stride=4, **SPARSE), 1)
    model.transformer.h[1].attn.config = copy.deepcopy(model.config)  # layer 1 keeps its own attention
    with pytest.raises(mst_compile.MstCompileError, match=r"layers \[1\] never called it"):
        export_hf(model, tmp_path / "hf", sm)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "mst_attention")


def test_bad_input():
    with pytest.raises(mst_compile.MstCompileError, match="not a Hugging Face model"):
        export_hf(torch.nn.Linear(2, 2), "unused")
    model, sm, _ = _trained(mst_compile.MSTConfig(update_interval=2), 0, total_steps=4)
    with pytest.raises(mst_compile.MstCompileError, match="sm was not made from this model"):
        export_hf(hf_gpt2(), "unused", sm)
    with pytest.raises(mst_compile.MstCompileError, match="has no mst_summary.json"):
        read_summary(".")


HF_MODEL_FILE = '''
import torch
import mst_compile
from transformers import GPT2Config, GPT2LMHeadModel

def model():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

def example_inputs():
    return (torch.randint(0, 64, (2, 16)),)

def config():
    return mst_compile.MSTConfig(update_interval=1, warmup_end=0.25, ultra_end=0.75)  # HSA to the end

def data():
    return torch.arange(4000) % 64

def train_config():
    return {"steps": 8, "batch_size": 4, "block_size": 16, "eval_iters": 1, "eval_interval": 4, "log_interval": 1}
'''


def test_cli_exports_a_run_from_another_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "hfm.py").write_text(HF_MODEL_FILE)
    monkeypatch.chdir(work)
    r = CliRunner().invoke(main, ["train", "hfm.py", "--out", "run", "--quiet"])  # a relative model path
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)  # elsewhere: the run folder records the model file by absolute path
    r = CliRunner().invoke(main, ["export", "work/run", "--format", "hf", "out"])
    assert r.exit_code == 0, r.output
    assert "masks folded in, attention at the end of training mixed (config.json selects the mst_hsa" in r.output
    loaded = _load(tmp_path / "out")
    ck = torch.load(work / "run/checkpoints/last.pt", weights_only=True)
    for n, p in loaded.state_dict().items():
        if n in ck["model"]:
            assert torch.equal(p, ck["model"][n]), n
    assert read_summary(tmp_path / "out")["run"]["step"] == 8
    # blocks of 16 tokens: the default stride 16 / 8 = 2 is kept; the run loaded in PyTorch agrees
    assert json.loads((tmp_path / "out/config.json").read_text())["mst_attention"]["0"] == {"pattern": "sparse", "stride": 2}
    trained = mst_compile.load("work/run")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for T in (16, 9):
            torch.testing.assert_close(loaded(input_ids=ids[:, :T]).logits, trained(ids[:, :T]).logits, rtol=0, atol=1e-4)
    r = CliRunner().invoke(main, ["export", "work/run", "--format", "hf", "--attention", "sparse"])
    assert r.exit_code == 2 and "--attention" in r.output
