"""MSTCallback in a Hugging Face Trainer: sparse ops and attention in effect, real steps only, logs,
checkpoints that resume exactly, DDP, and bad input caught at train begin."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _models import hf_gpt2

import mst_compile

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from _torchrun import run_two_ranks
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from mst_compile.integrations.transformers import STATE_FILE, MSTCallback

CFG = mst_compile.MSTConfig(update_interval=1, attention_phases=("ultra",), sparsity=0.8, final_sparsity=0.5, warmup_end=0.25, ultra_end=0.75,
                            stride=4)


class Blocks(torch.utils.data.Dataset):
    """Fixed-length token blocks with a learnable pattern (labels = input_ids: the model shifts them)."""

    def __init__(self, n=64, T=16):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 64, (n, 1), generator=g)
        self.x = (start + torch.arange(T)) % 64  # (n, T)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i], "attention_mask": torch.ones_like(self.x[i])}


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                save_steps=4, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _model():
    torch.manual_seed(0)
    return hf_gpt2()


class Record(TrainerCallback):
    """Listed after MSTCallback: watches what the captured module runs during training."""

    def __init__(self, mst_cb):
        self.mst_cb, self.patterns, self.sparse_calls = mst_cb, [], 0

    def on_train_begin(self, args, state, control, **kw):
        sm = self.mst_cb.sm
        for site in sm.mst.attention_modules().values():
            site.register_forward_pre_hook(lambda m, a: self.patterns.append(m.pattern) if torch.is_grad_enabled() else None)
        for sw in sm.mst.sparse_weights().values():
            sw.register_forward_pre_hook(lambda m, a: setattr(self, "sparse_calls", self.sparse_calls + 1))


def _train(out, model=None, cb=None, extra=(), resume=None, trainer_cls=Trainer, **kw):
    model = model or _model()
    cb = cb or MSTCallback(CFG, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, args=_args(out, **kw), train_dataset=Blocks(), callbacks=[cb, *extra])
        trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def test_patched_forward_is_the_models_loss_through_the_sparse_ops():
    model = _model()
    x = Blocks()[0]["input_ids"][None].repeat(2, 1)  # (2, T)
    want = model(input_ids=x, labels=x)
    cb = MSTCallback(CFG, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb.on_train_begin(_args("unused"), TrainerState(max_steps=8), None, model=model, optimizer=opt,
                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0))
    calls = []
    hooks = [sw.register_forward_pre_hook(lambda m, a: calls.append(1)) for sw in cb.sm.mst.sparse_weights().values()]
    got = model(input_ids=x, labels=x, attention_mask=torch.ones_like(x))
    assert len(calls) == len(hooks) > 0, "every sparse weight site must run"
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(mst_compile.MstCompileError, match="padding"):
        model(input_ids=x, attention_mask=torch.zeros_like(x))
    cb.on_train_end(None, None, None)
    assert "forward" not in model.__dict__


def test_trainer_runs_mst(tmp_path):
    cb = MSTCallback(CFG, seed=5)
    rec = Record(cb)
    trainer, _ = _train(tmp_path, cb=cb, extra=[rec])
    mst = cb.sm.mst
    assert mst.step_count == trainer.state.global_step == 8 and mst.schedule.total_steps == 8
    assert rec.sparse_calls >= 8 * len(mst.sparse_weights())
    assert "sparse" in rec.patterns and "dense" in rec.patterns  # ultra phase sparse, warm-up dense
    params = dict(trainer.model.named_parameters())
    for n, m in mst.masks().items():
        assert torch.all(params[n][~m] == 0), f"masked weights of {n} must be zero"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 9))
    assert {h["mst_phase"] for h in logs} == {"warmup", "ultra", "restoration"}
    assert min(h["mst_density"] for h in logs) < 0.3 and all(h["mst_flops"] <= h["mst_dense_flops"] for h in logs) and logs[-1]["mst_flop_reduction"] > 1.5
    assert logs[-1]["mst_flops"] == pytest.approx(mst.flops.mst_total)
    for step in (4, 8):
        sd = torch.load(tmp_path / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert sd["step"] == step
    assert "forward" not in trainer.model.__dict__  # the model's own forward after training


class _LrSpy(TrainerCallback):
    """Listed after MSTCallback: the learning rate each optimizer step runs with, and the masks' density then."""

    def __init__(self, mst_cb):
        self.mst_cb, self.seen = mst_cb, []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        masks = self.mst_cb.sm.mst.masks().values()
        density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        self.seen.append((state.global_step, [g["lr"] for g in optimizer.param_groups], density))


def test_the_learning_rate_follows_the_density_in_the_trainer(tmp_path):
    """lr_density_power=0.5: every optimizer step runs at the Trainer's linear schedule (3e-3 · (1 − k/8), computed
    here) times (1/density)^0.5 of the masks at that step; the log names the factor."""
    cb = MSTCallback(CFG.replace(lr_density_power=0.5), seed=5)
    spy = _LrSpy(cb)
    trainer, _ = _train(tmp_path, cb=cb, extra=[spy])
    assert [k for k, _, _ in spy.seen] == list(range(8))
    for k, lrs, density in spy.seen:
        want = 3e-3 * (1 - k / 8) * density ** -0.5
        assert lrs == pytest.approx([want] * len(lrs), rel=1e-6), f"step {k}"
    assert min(d for _, _, d in spy.seen) < 0.5  # the factor was well above 1 somewhere
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["mst_lr_scale"] == pytest.approx(cb.sm.mst.density() ** -0.5)


def test_a_learning_rate_that_cannot_follow_the_density_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lr_density_scope='weight' is not supported"):
        MSTCallback(CFG.replace(lr_density_power=0.5, lr_density_scope="weight"))
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Blocks(), callbacks=[MSTCallback(CFG, seed=5)],
                          optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2)))
        with pytest.raises(mst_compile.MstCompileError, match="the Trainer has a StepLR: use such a scheduler"):
            trainer.train()
    assert trainer.state.global_step == 0
    # with the power off the same scheduler is the Trainer's business
    _train(tmp_path / "off", cb=MSTCallback(CFG.replace(lr_density_power=0.0), seed=5), max_steps=2)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resumed_trainer_run_equals_the_uninterrupted_one(tmp_path):
    whole, cb_w = _train(tmp_path / "whole")
    _train(tmp_path / "split", extra=[_StopAt(4)])
    split, cb_s = _train(tmp_path / "split", resume=True)
    assert cb_s.sm.mst.step_count == 8
    for n, m in cb_w.sm.mst.masks().items():
        assert torch.equal(m, cb_s.sm.mst.masks()[n]), f"mask of {n} differs"
    ps = dict(split.model.named_parameters())
    for n, p in whole.model.named_parameters():
        assert torch.equal(p, ps[n]), f"weight {n} differs"
    assert cb_w.sm.mst.flops.as_dict() == cb_s.sm.mst.flops.as_dict()


class _Overflow(Trainer):
    """A Trainer under a loss scaler whose steps 3 and 6 overflow (the scaler skips them)."""

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        return loss * float("inf") if self.state.global_step in (2, 5) else loss


def test_a_skipped_step_does_not_advance_mst(tmp_path):
    model = _model()
    cb = MSTCallback(CFG, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _Overflow(model=model, args=_args(tmp_path, logging_nan_inf_filter=False, max_grad_norm=0.0, optim="adamw_torch"),
                            train_dataset=Blocks(), callbacks=[cb])
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # CPU has no fp16 scaler
        trainer.train()
    assert trainer.state.global_step == 8 and cb.sm.mst.step_count == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_input_fails_at_train_begin(tmp_path):
    class Uncapturable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64)

        def forward(self, input_ids, labels=None, attention_mask=None):
            h = self.emb(input_ids)
            if float(h.sum()) > -1e30:  # a Python branch on a tensor value: neither fx nor export captures it
                h = h * 2
            logits = self.out(h)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1))
            return {"loss": loss, "logits": logits}

    m = Uncapturable()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(mst_compile.CaptureError, match="MSTCallback: cannot capture Uncapturable"):
        _train(tmp_path / "u", model=m)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters()), "no step may run"

    class NotTorch:  # steps like an optimizer but is none
        def __init__(self, params):
            self.param_groups = [{"params": list(params), "lr": 1e-3}]
            self.state = {}

        def step(self, closure=None):
            pass

        def zero_grad(self, set_to_none=True):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, sd):
            pass

    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = NotTorch(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), lambda s: 1.0)
        trainer = Trainer(model=model, args=_args(tmp_path / "o"), train_dataset=Blocks(), callbacks=[MSTCallback(CFG, seed=5)],
                          optimizers=(opt, sched))
        with pytest.raises(mst_compile.MstCompileError, match="the Trainer's optimizer is a NotTorch, not a torch.optim.Optimizer"):
            trainer.train()
    assert trainer.state.global_step == 0



@pytest.mark.parametrize("setting", ["fsdp", "deepspeed", "env"])
def test_a_sharded_trainer_is_refused_in_one_line_before_capture(setting, monkeypatch):
    """FSDP or DeepSpeed asked of the Trainer: one line naming the setting and the supported order, nothing captured."""
    from types import SimpleNamespace

    args = SimpleNamespace(fsdp=["full_shard"] if setting == "fsdp" else None,
                           deepspeed="ds_config.json" if setting == "deepspeed" else None)
    if setting == "env":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cb = MSTCallback(CFG, seed=5)
    with pytest.raises(mst_compile.MstCompileError) as e:
        cb.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), None, model=_model(),
                          optimizer=torch.optim.SGD(_model().parameters(), lr=0.1))
    msg = str(e.value)
    assert "\n" not in msg and "supports DDP only" in msg and cb.sm is None
    assert {"fsdp": "TrainingArguments.fsdp=['full_shard']", "deepspeed": "TrainingArguments.deepspeed='ds_config.json'",
            "env": "ACCELERATE_USE_FSDP=true"}[setting] in msg


@pytest.mark.torchrun
@pytest.mark.slow
def test_trainer_under_ddp_keeps_ranks_identical(tmp_path):
    out = tmp_path / "verdict.json"
    run_two_ranks("_trainer_ddp_worker.py", tmp_path / "run", out, timeout=300)
    v = json.loads(out.read_text())
    assert v["world"] == 2 and v["steps"] == [8, 8]
    assert v["masks_identical"] and v["weights_identical"] and v["min_density"] < 0.3
    assert (tmp_path / "run" / "checkpoint-8" / STATE_FILE).is_file()


@pytest.mark.slow
def test_the_example_script_trains_and_exports(tmp_path):
    """examples/hf_trainer.py as a user runs it: Trainer + MSTCallback, checkpoints, then export_hf."""
    from transformers import AutoModelForCausalLM

    script = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"
    env = {**os.environ, "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(script), "--steps", "8", "--out", str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("done: density") and "FLOP reduction" in line, r.stdout[-2000:]
    density = float(line.split("density ")[1].split(",")[0])
    assert 0 < density < 1
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [f"checkpoint-{k}" for k in (2, 4, 6, 8)]
    assert all((tmp_path / "out" / f"checkpoint-{k}" / "mst_state.pt").is_file() for k in (2, 4, 6, 8))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert model.config._attn_implementation == "mst_hsa" and model.config.mst_attention["0"] == {"pattern": "sparse", "stride": 16}
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n]
    zeros = sum(int((p == 0).sum()) for p in matrices) / sum(p.numel() for p in matrices)
    assert zeros > 0.45  # the masked weights were folded in as exact zeros (the run ends at final_sparsity 0.5)
