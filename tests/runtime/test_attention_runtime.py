"""Attention at run time: per-site patterns from MSTConfig, hand-set patterns that persist, and what the
FLOP ledger charges when a padding mask sends a sparse site to masked dense SDPA (docs/design.md §5-6)."""
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import ROOT, tiny_gpt
from torch import nn

import mst_compile
from mst_compile.config import MSTConfig
from mst_compile.ops.attention import pattern_mask
from mst_compile.train.options import (
    TrainConfig,
    dumps_config,
    parse_flag,
    read_config_file,
)

RULES = {"h.*.attn": {"warmup": "local", "ultra": "strided"}, "h.1.attn": "sparse"}


# -- the config field ----------------------------------------------------------------------------
def test_attention_sites_resolve_per_site_and_phase_later_rules_win():
    c = MSTConfig(attention="sparse", attention_phases=("ultra",), attention_sites=RULES, attention_depth=1.0)
    got = {(s, p): c.attention_pattern(s, p) for s in ("h.0.attn", "h.1.attn", "other") for p in ("warmup", "ultra", "restoration")}
    assert got == {
        ("h.0.attn", "warmup"): "local", ("h.0.attn", "ultra"): "strided", ("h.0.attn", "restoration"): "dense",
        # the string rule comes later: its pattern in attention_phases, dense elsewhere
        ("h.1.attn", "warmup"): "dense", ("h.1.attn", "ultra"): "sparse", ("h.1.attn", "restoration"): "dense",
        ("other", "warmup"): "dense", ("other", "ultra"): "sparse", ("other", "restoration"): "dense",
    }
    assert c.unmatched_attention_sites(["h.0.attn", "h.1.attn"]) == []
    assert c.unmatched_attention_sites(["blocks.0.attn"]) == ["h.*.attn", "h.1.attn"]


def test_attention_sites_round_trip_through_dict_json_and_toml(tmp_path):
    c = MSTConfig(attention_sites=RULES)
    assert MSTConfig.from_dict(c.to_dict()) == c
    assert MSTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    f = tmp_path / "run.toml"
    f.write_text(dumps_config(TrainConfig(steps=40), c))
    _, mst = read_config_file(f)
    assert MSTConfig.from_dict(mst) == c
    assert list(mst["attention_sites"]) == list(RULES), "rule order survives TOML (later rules win)"


@pytest.mark.parametrize("value,words", [
    ("h.*", "MSTConfig.attention_sites='h.*' is invalid: expected a dict of site name or glob"),
    ({"": "dense"}, "got the key ''"),
    ({"h.0.attn": "banded"}, "MSTConfig.attention_sites['h.0.attn']='banded' is invalid: expected one of dense, local, strided, sparse"),
    ({"h.0.attn": {"middle": "dense"}}, "phases from warmup, ultra, restoration; got 'middle'"),
    ({"h.0.attn": {"ultra": "banded"}}, "MSTConfig.attention_sites['h.0.attn']['ultra']='banded' is invalid"),
    ({"h.0.attn": {}}, "a non-empty dict {phase: pattern}"),
])
def test_bad_attention_sites_name_field_value_and_allowed(value, words):
    with pytest.raises(ValueError) as e:
        MSTConfig(attention_sites=value)
    assert words in str(e.value)


def test_config_stays_importable_without_torch():
    code = "import sys; from mst_compile.config import MSTConfig; MSTConfig(attention_sites={'h.*': 'local'}); " \
           "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_attention_sites_flag():
    assert parse_flag("attention_sites", ["h.*.attn=local", "h.0.attn=warmup:dense, ultra:sparse"]) == {
        "h.*.attn": "local", "h.0.attn": {"warmup": "dense", "ultra": "sparse"}}
    for bad in ("h.0.attn", "=local", "h.0.attn=ultra:dense,local"):
        with pytest.raises(ValueError, match="--attention-sites"):
            parse_flag("attention_sites", [bad])


# -- the scheduler -------------------------------------------------------------------------------
def _run(sm, opt, steps, seen):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        seen.append((sm.mst.step_count + 1, sm.mst.phase, dict(sm.mst.attention_patterns())))
        x = torch.randint(0, 64, (2, 17), generator=g)
        logits = sm(x[:, :-1])  # (B, T, vocab)
        F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def _sparsified(**kw):
    cfg = MSTConfig(update_interval=2, warmup_end=0.25, ultra_end=0.75, stride=4, attention_phases=("ultra",),
                    attention_depth=1.0, **kw)
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=12)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    return sm, opt, cfg


def test_every_iteration_runs_the_configured_pattern_of_each_site():
    sm, opt, cfg = _sparsified(attention_sites=RULES)
    sm.mst.attach(opt)
    seen = []
    _run(sm, opt, 12, seen)
    assert {p for _, p, _ in seen} == {"warmup", "ultra", "restoration"}
    for step, phase, patterns in seen:
        assert patterns == {s: cfg.attention_pattern(s, phase) for s in patterns}, f"step {step}"
    assert seen[0][2] == {"h.0.attn": "local", "h.1.attn": "dense"}


def test_set_attention_persists_across_phase_changes_until_set_again():
    sm, opt, _ = _sparsified()
    sm.mst.attach(opt)
    sm.mst.set_attention({"h.0.attn": "local"}, stride=3)  # in warm-up, where the schedule says dense
    seen = []
    _run(sm, opt, 5, seen)  # warm-up into ultra (step 4)
    assert [s[2]["h.0.attn"] for s in seen] == ["local"] * 5
    assert [s[2]["h.1.attn"] for s in seen] == ["dense"] * 3 + ["sparse"] * 2
    assert sm.mst.attention_modules()["h.0.attn"].stride == 3
    state = sm.mst.state_dict()
    sm.mst.set_attention({"h.0.attn": "strided"})  # set again: the new one persists
    _run(sm, opt, 5, seen)  # into restoration (iteration 10)
    assert [s[2]["h.0.attn"] for s in seen[5:]] == ["strided"] * 5
    assert [s[2]["h.1.attn"] for s in seen[5:]] == ["sparse"] * 4 + ["dense"]
    sm.mst.set_attention({"h.0.attn": None})  # back to the schedule at once (restoration: dense)
    assert sm.mst.attention_patterns() == {"h.0.attn": "dense", "h.1.attn": "dense"}
    # a resumed run keeps the hand-set pattern of the checkpoint
    other, opt2, _ = _sparsified()
    other.mst.attach(opt2)
    other.mst.load_state_dict(state)
    assert other.mst.attention_patterns() == {"h.0.attn": "local", "h.1.attn": "sparse"}
    with pytest.raises(ValueError, match="h.1.attn.*'banded'"):
        sm.mst.set_attention({"h.0.attn": "local", "h.1.attn": "banded"})
    assert sm.mst.attention_patterns()["h.0.attn"] == "dense", "a bad call changes nothing"


def test_a_rule_that_matches_no_site_is_an_error():
    with pytest.raises(ValueError, match=r"attention_sites: the rule\(s\) \['blocks\.\*'\] match no attention site.*h\.0\.attn"):
        _sparsified(attention_sites={"h.*.attn": "local", "blocks.*": "dense"})


# -- the ledger with a padding mask --------------------------------------------------------------
class PaddedAttention(nn.Module):
    """One causal attention layer whose mask also hides padded keys (an input-dependent mask)."""

    def __init__(self, vocab=32, d=16, n_head=2):
        super().__init__()
        self.emb, self.qkv, self.head = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, vocab)
        self.n_head = n_head

    def forward(self, idx, keep):
        B, T = idx.shape
        q, k, v = self.qkv(self.emb(idx)).split(self.head.in_features, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal & keep.bool()[:, None, None, :])
        return self.head(y.transpose(1, 2).reshape(B, T, -1))


def test_padding_mask_is_charged_as_the_dense_attention_that_runs():
    B, T, l, d, n_head = 2, 16, 4, 16, 2
    idx = torch.randint(0, 32, (B, T))
    full = torch.ones(B, T, dtype=torch.long)
    cfg = MSTConfig(update_interval=5, warmup_end=0.0, ultra_end=1.0, sparsity=0.5, stride=l)
    sm = mst_compile.sparsify(PaddedAttention(), cfg, total_steps=10, example_inputs=(idx, full))
    assert len(sm.mst.attention_modules()) == 1
    opt = torch.optim.SGD(sm.parameters(), lr=0.0)
    sm.mst.attach(opt)
    assert set(sm.mst.attention_patterns().values()) == {"sparse"}
    per_key = 12.0 * (d // n_head) * n_head * B  # 4·d_head·n_heads per query token and key, ×3 with backward
    padded = full.clone()
    padded[1, -5:] = 0  # right padding: the site falls back to masked dense SDPA
    for keep, keys in ((full, pattern_mask(T, l, "sparse").sum().item()), (padded, T * (T + 1) / 2)):
        before = sm.mst.flops.attention_mst
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the once-per-site "runs as masked dense attention" note
            sm(idx, keep).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        charged = sm.mst.flops.attention_mst - before
        assert charged == pytest.approx(per_key * keys, rel=1e-12), "padded" if keep is padded else "no padding"


def test_mstc_train_attention_sites_flag(tmp_path):
    from _train_models import TINY, write
    from click.testing import CliRunner

    from mst_compile.cli import main
    from mst_compile.train.metrics import read_jsonl

    f = write(tmp_path, "tiny.py", TINY)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(f), "--steps", "8", "--update-interval", "1", "--quiet", "--out", str(out),
                                  "--attention-sites", "h.*.attn=local", "--attention-sites", "h.0.attn=ultra:dense"])
    assert r.exit_code == 0, r.output
    ultra = [x["attention"] for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "train" and x["phase"] == "ultra"]
    assert ultra and all(a == {"h.0.attn": "dense", "h.1.attn": "local"} for a in ultra)
    _, mst = read_config_file(out / "config.toml")
    assert mst["attention_sites"] == {"h.*.attn": "local", "h.0.attn": {"ultra": "dense"}}
    bad = CliRunner().invoke(main, ["train", str(f), "--steps", "8", "--update-interval", "1", "--out", str(tmp_path / "bad"),
                                    "--attention-sites", "h.0.attn=banded"])
    assert bad.exit_code != 0 and "attention_sites['h.0.attn']='banded'" in bad.output and "Traceback" not in bad.output


def test_the_pattern_mask_is_built_once_per_shape_and_reused():
    from mst_compile.ops.attention import pattern_mask

    a = pattern_mask(48, 6, "sparse")
    assert pattern_mask(48, 6, "sparse") is a  # the padding fallback does not rebuild it per call
    assert pattern_mask(48, 6, "local") is not a and pattern_mask(40, 6, "sparse").shape == (40, 40)
    i, j = torch.arange(48)[:, None], torch.arange(48)[None, :]
    assert torch.equal(a, (j <= i) & (((i - j) < 6) | ((i - j) % 6 == 0)))  # independent of allowed_positions
