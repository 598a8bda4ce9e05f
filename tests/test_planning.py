"""mst_compile.plan / mstc plan: the forecast equals the ledger of a real run; hours, gap and bad input."""
import json
import math
import warnings

import pytest
from _train_models import TINY, write
from click.testing import CliRunner

import mst_compile
from mst_compile import Ablation, MSTConfig
from mst_compile.cli import main
from mst_compile.train.loop import train
from mst_compile.train.options import TrainConfig

STEPS, B, T = 24, 4, 32
FAKE_MAP = {"source": "test", "corpus": "test", "measured_range": [10.0, 1000.0],
            "configs": {name: {"fit": {"a": 40.0, "b": 0.5, "points": 3},
                               "points": [{"tokens_per_param": 10.0, "gap_pct": 12.6, "reduction": 4.5},
                                          {"tokens_per_param": 1000.0, "gap_pct": 1.3, "reduction": 4.6}],
                               "within_5pct_at": 64.0, "within_1pct_at": 1600.0} for name in ("default", "paper")}}


def _regime_module():
    import mst_compile.regime

    return mst_compile.regime


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    return write(tmp_path, "tiny.py", TINY)


@pytest.mark.parametrize("cfg", [
    MSTConfig(update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4),
    MSTConfig.preset("paper", update_interval=2, warmup_end=0.25, stride=4),
    MSTConfig(update_interval=2, warmup_end=0.25, stride=4, attention_phases=("ultra",), final_sparsity=0.0,
              ablation=Ablation(attention_restore="widen", restoration_shape="linear")),
    MSTConfig(update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4, tile=8),
    MSTConfig(update_interval=4, warmup_end=0.0, stride=4, attention_depth=0.5, lr_density_power=0.5),
], ids=["defaults", "paper", "widen", "tiles", "depth"])
def test_plan_equals_the_ledger_of_the_real_run(model_file, tmp_path, cfg):
    tc = TrainConfig(steps=STEPS, batch_size=B, block_size=T, eval_iters=1, eval_interval=STEPS, log_interval=1)
    summary = train(model_file, tc, cfg, out=tmp_path / "run", progress=False)
    p = mst_compile.plan(model_file, STEPS * B * T, config=cfg, block_size=T, batch_size=B, hardware="h100")
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
    # the dense model to beat: the run's own per-step densities (logged every step) over its sparse weights
    dens = [r["density"] for r in rows if r.get("kind") == "train"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_model", model_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.model()
    sparse = sum(net.get_parameter(n).numel() for n in summary["final_densities"])
    total = sum(q.numel() for q in net.parameters())  # tied: counted once
    assert len(dens) == STEPS
    assert p.avg_active_params == pytest.approx(total - sparse + sparse * sum(dens) / STEPS, rel=1e-6)
    assert total - sparse < p.avg_active_params < total
    # the plan names that model as the one to train instead, with its width at the same depth (params ~ width^2)
    assert f"about {p.avg_active_params:,.0f} parameters (e.g. the same depth at {(p.avg_active_params / total) ** 0.5:.2f}x the width)" \
        in p.render() and "train it instead" in p.render()


def test_gpu_hours_save_nothing_with_masked_dense_kernels(model_file):
    gpu = mst_compile.plan(model_file, 1e6, block_size=T, batch_size=B, hardware="h100")
    assert gpu.mst_flops < gpu.dense_flops
    assert gpu.mst_hours == pytest.approx(gpu.dense_hours)  # masked dense GEMMs, HSA not measured on GPU
    assert gpu.dense_hours == pytest.approx(gpu.dense_flops / (989e12 * 0.4 * 3600))


def _fake_times(calls):
    """time_steps that returns set times: 0.5 s dense, 0.2/0.1/0.3 s per phase, and records its arguments."""
    from mst_compile.timing import StepTimes

    def time_steps(model, sm, inputs, states, *, batch_size, block_size, device):
        calls.append({"states": states, "batch_size": batch_size, "block_size": block_size, "device": device})
        fb = {"dense": 0.4, "warmup": 0.15, "ultra": 0.05, "restoration": 0.25}
        return StepTimes("cpu, test", batch_size, block_size, fb, dict.fromkeys(fb, 0.1 / 2), dict.fromkeys(fb, 3))

    return time_steps


@pytest.mark.parametrize("hardware", ["cpu", "local"])
def test_hours_on_this_machine_are_the_steps_times_the_measured_step_times(model_file, monkeypatch, hardware):
    import torch

    import mst_compile.timing

    calls = []
    monkeypatch.setattr(mst_compile.timing, "time_steps", _fake_times(calls))
    cfg = MSTConfig(update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4)
    p = mst_compile.plan(model_file, 40 * B * T, config=cfg, block_size=T, batch_size=B, hardware=hardware)
    assert p.steps == 40 and [ph["steps"] for ph in p.phases] == [10, 20, 10]
    assert p.dense_hours * 3600 == pytest.approx(40 * 0.45)
    assert p.mst_hours * 3600 == pytest.approx(10 * 0.2 + 20 * 0.1 + 10 * 0.3)
    (call,) = calls
    assert call["batch_size"] == B and call["block_size"] == T
    assert call["device"].type == ("cpu" if hardware == "cpu" or not torch.cuda.is_available() else "cuda")
    # each phase is timed at its mean density, with the attention the schedule gives it
    for ph in p.phases:
        sparsity, patterns = call["states"][ph["phase"]]
        assert sparsity == pytest.approx(1 - ph["density"])
        assert list(patterns.values()) == [("sparse", 4), ("dense", 32)]  # the defaults: HSA in every phase, first half
    assert call["states"]["ultra"][0] == pytest.approx(0.85, abs=1e-3)  # whole weights: s_max up to rounding
    measured = p.hardware["measured"]
    assert measured["step_s"] == pytest.approx({"dense": 0.45, "warmup": 0.2, "ultra": 0.1, "restoration": 0.3})
    text = p.render()
    assert "timed, not estimated" in text and "dense 0.45 s; MST warmup 0.2 s, ultra 0.1 s, restoration 0.3 s" in text


def test_timing_runs_the_model_and_leaves_its_weights_alone():
    """A real timing: the plan's hours are its steps times the step times it measured, and the
    module it was given trains nothing (AdamW at learning rate 0, weights put back)."""
    from _models import tiny_gpt

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = mst_compile.plan(model, 24 * 4 * 16, config=MSTConfig(update_interval=2, warmup_end=0.25, ultra_end=0.75, stride=4), block_size=16,
                         batch_size=4, hardware="cpu")
    m = p.hardware["measured"]
    assert m["device"].startswith("cpu") and m["batch_size"] == 4 and set(m["step_s"]) == {"dense", "warmup", "ultra", "restoration"}
    assert all(0 < t < 5 for t in m["step_s"].values())
    assert p.dense_hours * 3600 == pytest.approx(p.steps * m["step_s"]["dense"])
    assert p.mst_hours * 3600 == pytest.approx(sum(ph["steps"] * m["step_s"][ph["phase"]] for ph in p.phases))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_a_large_batch_is_timed_at_fewer_sequences_and_scaled():
    from mst_compile.timing import TOKENS_PER_TIMED_STEP, StepTimes, timed_batch

    assert timed_batch(16, 128) == 16 and timed_batch(480, 1024) == TOKENS_PER_TIMED_STEP // 1024 and timed_batch(2, 10**6) == 1
    t = StepTimes("cpu", 8, 1024, {"dense": 2.0}, {"dense": 0.5}, {"dense": 3})
    assert t.step("dense", 480) == pytest.approx(2.0 * 480 / 8 + 0.5)  # forward/backward per sequence, one optimizer step


def test_tiles_save_cpu_hours_where_the_blocked_kernel_pays_and_none_on_gpus(model_file):
    plans = {(hw, tile): mst_compile.plan(model_file, 1e6, config=MSTConfig(tile=tile), block_size=T, batch_size=B, hardware=hw)
             for hw in ("cpu", "h100") for tile in (8, 16)}
    for tile in (8, 16):
        gpu = plans[("h100", tile)]
        assert gpu.mst_hours == pytest.approx(gpu.dense_hours)  # no faster than dense on a GPU: counted at dense speed
        assert "optimistic" in gpu.hardware["kernels"] and "h200.md" in gpu.hardware["kernels"]
    cpu16 = plans[("cpu", 16)]  # CPU hours are timed steps of this model: whatever its kernels really save here
    assert "measured" in cpu16.hardware and cpu16.mst_hours > 0 and cpu16.dense_hours > 0
    assert cpu16.config["tile"] == 16 and cpu16.reduction > 1.2


def test_expected_gap_reads_the_regime_map(model_file, monkeypatch):
    monkeypatch.setattr(_regime_module(), "regime_map", lambda: FAKE_MAP)
    inside = mst_compile.plan(model_file, 30 * 34_000, block_size=T, batch_size=B, hardware="h100")  # TINY has ~34k params
    r = inside.tokens_per_param
    assert inside.expected_gap == pytest.approx(40.0 * r ** -0.5)
    assert inside.extrapolated is False and inside.regime["series"] == "default"
    outside = mst_compile.plan(model_file, 5000 * 34_000, block_size=T, batch_size=B * 64, hardware="h100")
    assert outside.extrapolated is True
    paper = mst_compile.plan(model_file, 30 * 34_000, config=MSTConfig.preset("paper"), block_size=T, batch_size=B, hardware="h100")
    assert paper.regime["series"] == "paper"


def test_regime_note_names_the_measured_figures(monkeypatch):
    regime = _regime_module()
    monkeypatch.setattr(regime, "regime_map", lambda: FAKE_MAP)
    msg = regime.regime_note(MSTConfig(), 12.0)
    assert "12.0 tokens per parameter" in msg and "+12.6% at 10 tokens/param" in msg and "64 tokens/param" in msg
    assert regime.regime_note(MSTConfig(), 100.0) is None


def test_train_notes_the_regime_once_at_start_and_not_when_quiet(model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(_regime_module(), "regime_map", lambda: FAKE_MAP)
    args = [str(model_file), "--steps", "4", "--batch-size", "2", "--block-size", str(T), "--eval-iters", "1", "--update-interval", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note in the output, not a Python warning
        loud = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "loud")])
        quiet = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "quiet"), "--quiet"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, loud.output + quiet.output
    notes = [line for line in loud.output.splitlines() if "tokens per parameter" in line]
    assert len(notes) == 1 and notes[0].startswith("note: this run trains ") and "Warning" not in loud.output, loud.output
    first = loud.output.splitlines()
    assert first[0].startswith("MST: ") and first[1] == notes[0]  # in the start-up lines, before the first step
    assert "tokens per parameter" not in quiet.output and len(quiet.output.strip().splitlines()) == 1, quiet.output


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


def test_cli_plan_on_this_cpu_says_it_timed_the_steps(model_file):
    r = CliRunner().invoke(main, ["plan", str(model_file), "--tokens", "2e5", "--hardware", "cpu", "--block-size", "16"])
    assert r.exit_code == 0, r.output
    assert "timing a dense step and an MST step per phase on this machine (cpu, " in r.output
    for words in ("timed, not estimated", "step time         dense ", "here (each phase's steps x its measured step"):
        assert words in r.output, words


@pytest.mark.parametrize("args, words", [
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "-3B"], "--tokens"),
    (["--tokens", "lots"], "--tokens"),
    (["--tokens", "1M", "--hardware", "tpu9"], "--hardware 'tpu9' is unknown"),
    (["--tokens", "1M", "--hardware", "h100", "--utilization", "2"], "--utilization 2 is invalid"),
    (["--tokens", "1M", "--peak-flops", "1e12"], "--peak-flops applies to the GPU presets"),
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
    p = mst_compile.plan(path, 1e6, block_size=64, batch_size=8, hardware="h100")
    assert p.params > 0 and math.isfinite(p.mst_flops) and p.mst_flops < p.dense_flops
    assert [ph["phase"] for ph in p.phases] == ["ultra", "restoration"]  # the defaults: sparse from step 0


def test_the_api_verb_survives_importing_its_module():
    import mst_compile.planning  # noqa: F401

    assert callable(mst_compile.plan) and mst_compile.plan is mst_compile.planning.plan


def test_bad_arguments_raise_value_errors(model_file):
    for kwargs, field in ((dict(tokens=0), "tokens"), (dict(tokens=1e6, batch_size=0), "batch_size"),
                          (dict(tokens=1e6, hardware="tpu"), "hardware"), (dict(tokens=1e6, hardware="h100", peak_flops=-1), "peak_flops"),
                          (dict(tokens=1e6, hardware="cpu", utilization=0.5), "utilization apply to the GPU presets")):
        with pytest.raises(ValueError, match=field):
            mst_compile.plan(model_file, **kwargs)
