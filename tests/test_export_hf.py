"""Hugging Face folders: from_pretrained loads them with the masks folded in and the same logits;
a model trained to the end with sparse attention says so and gets it back; the CLI writes them."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import hf_gpt2
from click.testing import CliRunner

import mst_compile

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

from mst_compile.cli import main
from mst_compile.export import export_hf, read_summary, with_trained_attention


def _trained(cfg, steps):
    torch.manual_seed(0)
    model = hf_gpt2()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = mst_compile.sparsify(model, cfg, example_inputs={"input_ids": x})
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
    cfg = mst_compile.MSTConfig(total_steps=8, update_interval=1, attention_phases=("ultra",), warmup_end=0.25, ultra_end=0.5, sparsity=0.9,
                                final_sparsity=0.7, stride=4)
    model, sm, x = _trained(cfg, 7)  # ends in restoration: sparse weights, dense attention
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


def test_sparse_attention_to_the_end_is_noted_and_reapplied(tmp_path):
    cfg = mst_compile.MSTConfig(total_steps=6, update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.5,
                                final_sparsity=0.5, stride=4, attention_phases=("warmup", "ultra", "restoration"))
    model, sm, x = _trained(cfg, 5)
    assert set(sm.mst.attention_patterns().values()) == {"sparse"}
    sm.eval()
    with torch.no_grad():
        want = sm(input_ids=x).logits
    folder = export_hf(model, tmp_path / "hf", sm)
    s = json.loads((folder / "mst_summary.json").read_text())
    assert s["attention_at_end"] == "sparse" and "with_trained_attention" in s["attention_note"]
    loaded = _load(folder)
    with torch.no_grad():
        dense = loaded(input_ids=x).logits
        assert not torch.allclose(dense, want, atol=1e-4), "the plain model runs dense attention"
        again = with_trained_attention(loaded, folder)
        torch.testing.assert_close(again(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(mst_compile.MstCompileError, match="not a Hugging Face model"):
        export_hf(torch.nn.Linear(2, 2), "unused")
    model, sm, _ = _trained(mst_compile.MSTConfig(total_steps=4, update_interval=2), 0)
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
    return mst_compile.MSTConfig(total_steps=8, update_interval=1, attention_phases=("ultra",), warmup_end=0.25, ultra_end=0.75, stride=4)

def data():
    return torch.arange(4000) % 64

def train_config():
    return {"batch_size": 4, "block_size": 16, "eval_iters": 1, "eval_interval": 4, "log_interval": 1}
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
    assert "masks folded in, attention at the end of training dense" in r.output
    loaded = _load(tmp_path / "out")
    ck = torch.load(work / "run/checkpoints/last.pt", weights_only=True)
    for n, p in loaded.state_dict().items():
        if n in ck["model"]:
            assert torch.equal(p, ck["model"][n]), n
    assert read_summary(tmp_path / "out")["run"]["step"] == 8
    r = CliRunner().invoke(main, ["export", "work/run", "--format", "hf", "--attention", "sparse"])
    assert r.exit_code == 2 and "--attention" in r.output
