"""mst_compile.plan / mstc plan: the forecast equals the ledger of a real run; hours, gap and bad input."""
import json
import math

import pytest
from _train_models import TINY, write
from click.testing import CliRunner

import mst_compile
from mst_compile import MSTConfig
from mst_compile.cli import main
from mst_compile.train.loop import train
from mst_compile.train.options import TrainConfig

STEPS, B, T = 24, 4, 32
FAKE_MAP = {"source": "test", "corpus": "test", "measured_range": [10.0, 1000.0],
            "configs": {name: {"fit": {"a": 40.0, "b": 0.5, "points": 3},
                               "points": [{"tokens_per_param": 10.0, "gap_pct": 12.6, "reduction": 4.5},
                                          {"tokens_per_param": 1000.0, "gap_pct": 1.3, "reduction": 4.6}],
                               "within_5pct_at": 64.0, "within_1pct_at": 1600.0} for name in ("default", "paper")}}


def _plan_module():
    import mst_compile.planning

    return mst_compile.planning


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    return write(tmp_path, "tiny.py", TINY)


@pytest.mark.parametrize("cfg", [
    MSTConfig(total_steps=STEPS, update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4),
    MSTConfig.preset("paper", total_steps=STEPS, update_interval=2, warmup_end=0.25, stride=4),
    MSTConfig(total_steps=STEPS, update_interval=2, warmup_end=0.25, stride=4, attention_phases=("ultra",), attention_restore="widen",
              restoration_shape="linear", final_sparsity=0.0),
    MSTConfig(total_steps=STEPS, update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4, tile=8),
], ids=["defaults", "paper", "widen", "tiles"])
def test_plan_equals_the_ledger_of_the_real_run(model_file, tmp_path, cfg):
    tc = TrainConfig(steps=STEPS, batch_size=B, block_size=T, eval_iters=1, eval_interval=STEPS, log_interval=1)
    summary = train(model_file, tc, cfg, out=tmp_path / "run", progress=False)
    p = mst_compile.plan(model_file, STEPS * B * T, config=cfg, block_size=T, batch_size=B, hardware="cpu")
    assert p.steps == STEPS and p.tokens == STEPS * B * T
    assert p.mst_flops == pytest.approx(summary["mst_flops"], rel=0.01)
    assert p.dense_flops == pytest.approx(summary["dense_flops"], rel=0.01)
    assert p.reduction > 1.2
    assert sum(ph["steps"] for ph in p.phases) == STEPS
    assert sum(ph["mst_flops"] for ph in p.phases) == pytest.approx(p.mst_flops)
    # per phase too: the run's metrics hold the cumulative ledger after every step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cum = {r["step"]: r["mst_flops"] for r in rows if r.get("kind") == "train"}
    for ph in p.phases:
        before = cum.get(ph["first_step"] - 1, 0.0)
        after = cum[ph["first_step"] + ph["steps"] - 1]
        assert ph["mst_flops"] == pytest.approx(after - before, rel=0.01), ph["phase"]


def test_gpu_hours_save_nothing_with_masked_dense_kernels(model_file):
    gpu = mst_compile.plan(model_file, 1e6, block_size=T, batch_size=B, hardware="h100")
    cpu = mst_compile.plan(model_file, 1e6, block_size=T, batch_size=B, hardware="cpu")
    assert gpu.mst_flops < gpu.dense_flops
    assert gpu.mst_hours == pytest.approx(gpu.dense_hours)  # masked dense GEMMs, HSA not measured on GPU
    assert gpu.dense_hours == pytest.approx(gpu.dense_flops / (989e12 * 0.4 * 3600))
    assert cpu.mst_hours < cpu.dense_hours  # CSR and HSA kernels are faster on CPU
    assert cpu.dense_hours / cpu.mst_hours < cpu.reduction  # realised below algorithmic


def test_tiles_save_cpu_hours_where_the_blocked_kernel_pays_and_none_on_gpus(model_file):
    plans = {(hw, tile): mst_compile.plan(model_file, 1e6, config=MSTConfig(tile=tile), block_size=T, batch_size=B, hardware=hw)
             for hw in ("cpu", "h100") for tile in (8, 16)}
    for tile in (8, 16):
        gpu = plans[("h100", tile)]
        assert gpu.mst_hours == pytest.approx(gpu.dense_hours)  # the Triton kernels are not yet measured on a GPU
        assert "not yet measured on a GPU" in gpu.hardware["kernels"]
    cpu8, cpu16 = plans[("cpu", 8)], plans[("cpu", 16)]
    assert cpu16.mst_hours < cpu8.mst_hours < cpu8.dense_hours  # 8x8 tiles stay masked dense; only HSA saves there
    assert "16x16-tile sparse linears on the blocked kernel" in cpu16.hardware["kernels"]
    assert cpu16.config["tile"] == 16 and cpu16.reduction > 1.2


def test_expected_gap_reads_the_regime_map(model_file, monkeypatch):
    monkeypatch.setattr(_plan_module(), "regime_map", lambda: FAKE_MAP)
    inside = mst_compile.plan(model_file, 30 * 34_000, block_size=T, batch_size=B)  # TINY has ~34k params
    r = inside.tokens_per_param
    assert inside.expected_gap == pytest.approx(40.0 * r ** -0.5)
    assert inside.extrapolated is False and inside.regime["series"] == "default"
    outside = mst_compile.plan(model_file, 5000 * 34_000, block_size=T, batch_size=B * 64)
    assert outside.extrapolated is True
    paper = mst_compile.plan(model_file, 30 * 34_000, config=MSTConfig.preset("paper"), block_size=T, batch_size=B)
    assert paper.regime["series"] == "paper"


def test_regime_warning_names_the_measured_figures(monkeypatch):
    pm = _plan_module()
    monkeypatch.setattr(pm, "regime_map", lambda: FAKE_MAP)
    msg = pm.regime_warning(MSTConfig(), 12.0)
    assert "12.0 tokens per parameter" in msg and "+12.6% at 10 tokens/param" in msg and "64 tokens/param" in msg
    assert pm.regime_warning(MSTConfig(), 100.0) is None


def test_train_warns_below_the_regime(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(_plan_module(), "regime_map", lambda: FAKE_MAP)
    tc = TrainConfig(steps=4, batch_size=2, block_size=T, eval_iters=1, eval_interval=4, log_interval=1)
    with pytest.warns(UserWarning, match="tokens per parameter"):
        train(model_file, tc, MSTConfig(total_steps=4, update_interval=1), out=tmp_path / "run", progress=False)


def test_cli_json_has_the_documented_keys(model_file):
    r = CliRunner().invoke(main, ["plan", str(model_file), "--tokens", "0.1M", "--batch-size", "4", "--block-size", "32",
                                  "--json", "--sparsity", "0.8"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    for key in ("params", "tokens", "tokens_per_param", "dense_flops", "mst_flops", "reduction", "phases", "hardware",
                "dense_hours", "mst_hours", "expected_gap", "extrapolated"):
        assert key in doc, key
    assert doc["config"]["sparsity"] == 0.8 and doc["tokens"] == round(1e5 / 128) * 128
    assert [p["phase"] for p in doc["phases"]] == ["warmup", "ultra", "restoration"]
    assert all(p["steps"] > 0 and p["mst_flops"] > 0 for p in doc["phases"])
    assert doc["reduction"] == pytest.approx(doc["dense_flops"] / doc["mst_flops"])


def test_cli_text_output(model_file):
    r = CliRunner().invoke(main, ["plan", str(model_file), "--tokens", "2e5", "--hardware", "a100"])
    assert r.exit_code == 0, r.output
    for word in ("parameters", "tokens/param", "MST FLOPs", "warmup", "restoration", "A100", "expected gap"):
        assert word in r.output, word


@pytest.mark.parametrize("args, words", [
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "-3B"], "--tokens"),
    (["--tokens", "lots"], "--tokens"),
    (["--tokens", "1M", "--hardware", "tpu9"], "--hardware 'tpu9' is unknown"),
    (["--tokens", "1M", "--utilization", "2"], "utilization"),
])
def test_cli_bad_input_is_one_line_and_exit_2(model_file, args, words):
    r = CliRunner().invoke(main, ["plan", str(model_file), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], r.output


def test_cli_has_no_steps_flag(model_file):
    r = CliRunner().invoke(main, ["plan", str(model_file), "--tokens", "1M", "--steps", "10"])
    assert r.exit_code == 2 and "No such option" in r.output  # the length is --tokens / (batch x block)


def test_cli_model_that_cannot_be_built(tmp_path):
    bad = write(tmp_path, "bad.py", "def model():\n    raise RuntimeError('no such layer')\n")
    missing = tmp_path / "missing.py"
    for path in (bad, missing, tmp_path / "nope.json"):
        r = CliRunner().invoke(main, ["plan", str(path), "--tokens", "1M"])
        assert r.exit_code == 2, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_hf_config_json(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    cfg = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    p = mst_compile.plan(path, 1e6, block_size=64, batch_size=8)
    assert p.params > 0 and math.isfinite(p.mst_flops) and p.mst_flops < p.dense_flops
    assert len(p.phases) == 3


def test_the_api_verb_survives_importing_its_module():
    import mst_compile.planning  # noqa: F401

    assert callable(mst_compile.plan) and mst_compile.plan is mst_compile.planning.plan


def test_bad_arguments_raise_value_errors(model_file):
    for kwargs, field in ((dict(tokens=0), "tokens"), (dict(tokens=1e6, batch_size=0), "batch_size"),
                          (dict(tokens=1e6, hardware="tpu"), "hardware"), (dict(tokens=1e6, peak_flops=-1), "peak_flops")):
        with pytest.raises(ValueError, match=field):
            mst_compile.plan(model_file, **kwargs)
