"""The trainer behind ``mstc train``: ``train()`` runs one model file with MST (or dense) to the end.

A step is nanoGPT's: ``grad_accum`` micro-batches of next-token cross-entropy, clip, AdamW with
linear warm-up and cosine decay. MST needs nothing more from the loop than ``sm.mst.attach(opt)``:
the runtime hooks the optimizer step and evolves the masks itself. The loop adds what a run needs
around it: deterministic data, evaluation, checkpoints that resume exactly, metrics and progress.
``setup`` builds the run (``train/setup.py``); here ``_run`` alternates ``_train_step``,
``_log_step``, ``_evaluate`` and ``_checkpoint`` on the ``RunState`` it returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import run_folder as rf
from ..config import MSTConfig
from ..errors import MstCompileError
from ..modelfile import ModelFile, load_model_file
from ..runtime.schedule import lr_multiplier
from . import distributed
from .accounting import ranks_identical
from .metrics import duration, human
from .options import TrainConfig, configs_for_model_file
from .precision import MAX_SKIPS
from .setup import RunState, setup
from .sharded import first_nonfinite, gather_state, ranks_agree
from .steps import StopRequest, lm_loss, logits_of, run_model

__all__ = ["TrainingDiverged", "TrainingInterrupted", "lm_loss", "logits_of", "lr_at", "run_model", "summary_line", "train"]

_EVAL_KEY = 2**40  # batch keys of evaluations never collide with training steps


class TrainingInterrupted(MstCompileError):
    """Ctrl-C (or SIGTERM): a checkpoint was saved and the run can be resumed."""


class TrainingDiverged(MstCompileError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_at(step: int, tc: TrainConfig, mst: MSTConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then ``tc.lr_schedule`` down to ``min_lr`` at
    ``schedule_steps`` (``steps`` unless a resume lengthened the run; ``min_lr`` after it).

    The same curve for a dense and a sparse run of the same length: ``mst`` only places the WSD decay
    (its restoration phase, unless ``lr_decay`` says otherwise), and a dense run has the same MSTConfig.
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / (tc.warmup_steps + 1)
    return tc.lr * lr_multiplier(step, mst, tc.schedule_steps or tc.steps, tc.min_lr / tc.lr, tc.lr_schedule, tc.lr_decay,
                                 tc.warmup_steps)


def _absolute(spec: str | None) -> str | None:
    """A data or tokenizer path relative to the current folder, made absolute (globs too)."""
    if spec is None or Path(spec).expanduser().is_absolute():
        return spec
    return str(Path.cwd() / spec)


def train(model_file: str | Path | ModelFile, train_config: TrainConfig | None = None, mst_config: MSTConfig | None = None, *,
          out: str | Path | None = None, resume: str | Path | None = None, progress: bool = True,
          stop_at: int | None = None) -> dict:
    """Train ``model_file``'s ``model()`` and return the run summary (also saved as summary.json).

    ``train_config`` / ``mst_config`` default to the model file's hooks. ``resume`` continues a run
    folder with its saved config. ``stop_at`` stops after that step as if interrupted (checkpoint
    saved, ``TrainingInterrupted`` raised): a run split in two that way equals the whole.
    """
    t_start = time.time()
    mf = model_file if isinstance(model_file, ModelFile) else load_model_file(model_file)
    if resume is not None and train_config is None:
        tc, mst = rf.load_run_config(resume)
    else:  # a new run, or a resume whose changes resume_configs accepted
        hook_tc, hook_mst = configs_for_model_file(mf, None, {}, {}) if train_config is None or mst_config is None else (None, None)
        mst, tc = mst_config or hook_mst, train_config or hook_tc
        tc = dataclasses.replace(tc, data=_absolute(tc.data), tokenizer=_absolute(tc.tokenizer))
    d = distributed.setup(tc.device, tc.fsdp)
    try:
        summary = _run(mf, tc, mst, d, out=out, resume=resume, progress=progress, stop_at=stop_at, t_start=t_start)
        d.barrier()  # no rank tears the process group down while another still talks over it
        return summary
    finally:
        d.close()


def _run(mf: ModelFile, tc: TrainConfig, mst: MSTConfig, d, *, out, resume, progress: bool, stop_at: int | None,
         t_start: float) -> dict:
    run = setup(mf, tc, mst, d, out=out, resume=resume, progress=progress, t_start=t_start)
    tc = run.tc  # resolved against the model (block size, intervals)
    run.acct.module.train()
    with StopRequest() as stop, warnings.catch_warnings():
        if (tc.schedule_steps or tc.steps) < tc.steps:  # a resume lengthened the run: the final phase is held on purpose
            warnings.filterwarnings("ignore", message="MST stepped past total_steps")  # (runtime/scheduler.py)
        try:
            for step in range(run.start, tc.steps):
                t0 = time.perf_counter()
                # what this step trains with (an update in opt.step changes it for the next one)
                now = {"phase": run.acct.phase, "density": run.acct.density(), "target_sparsity": run.acct.target_sparsity,
                       "attention": run.acct.patterns()}
                lr = lr_at(step, tc, run.mst) * run.acct.lr_scale()  # 1 unless MSTConfig.lr_density_power
                loss, stops = _train_step(run, step, lr, stop)
                done = step + 1
                run.acct.after_step(run.step_tokens)
                run.step_time += time.perf_counter() - t0
                _log_step(run, done, now, loss, lr)
                if done % tc.eval_interval == 0 or done == tc.steps:
                    _evaluate_and_log(run, done)
                if done % tc.checkpoint_interval == 0 or done == tc.steps or stops or done == stop_at:
                    _checkpoint(run, done)
                if (stops or done == stop_at) and done < tc.steps:
                    raise TrainingInterrupted(
                        f"interrupted after step {done}: checkpoint saved in {run.run_dir}; continue with "
                        f"mstc train {mf.path} --resume {run.run_dir}")
        finally:
            run.bar.close()
            if run.log is not None:
                run.log.close()
    return _finish(run)


def _train_step(run: RunState, step: int, lr: float, stop: StopRequest) -> tuple[float, bool]:
    """One optimizer step at ``lr``: (mean loss over all ranks, whether any rank asked to stop)."""
    tc, d, opt, prec = run.tc, run.d, run.opt, run.prec
    B, T = tc.batch_size, tc.block_size
    scales = run.acct.lr_scales()  # {} unless MSTConfig.lr_density_scope="weight"
    for g in opt.param_groups:
        g["lr"] = lr * scales.get(g.get("mst_weight"), 1.0)
    for _attempt in range(MAX_SKIPS):  # fp16: a step the grad scaler skips (inf gradients) is redone
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = run.data.batch("train", (step, micro, d.rank), B, T, tc.seed)
            # DDP: all-reduce once per step; FSDP2 reduce-scatters every micro-batch, masked per shard as it comes
            sync = run.net.no_sync() if d.on and not run.sharded and micro < tc.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with prec.autocast():
                    loss = lm_loss(run_model(run.net, run.inputs, x.to(d.device)), y.to(d.device))
                prec.backward(loss / tc.grad_accum)
            loss_sum += loss.item()
        loss_total, bad, stops = d.all_sum([loss_sum / tc.grad_accum, float(not math.isfinite(loss_sum)), float(stop.requested)])
        loss_val = loss_total / d.world
        if bad:  # before the optimizer step: no bad state reaches a checkpoint
            raise _diverged(f"loss became {loss_val} at step {step + 1}", run.run_dir)
        prec.unscale(opt)
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip)
        stepped = prec.step(opt)
        opt.zero_grad(set_to_none=True)
        if stepped:
            return loss_val, bool(stops)
    raise TrainingDiverged(f"the fp16 gradients overflowed {MAX_SKIPS} times in a row at step {step + 1} "
                           "(the grad scaler skipped every try): use --precision bf16 or a lower --lr")


def _log_step(run: RunState, done: int, now: dict, loss: float, lr: float) -> None:
    """Progress for every step; metrics.jsonl gets the updates and every log_interval-th step."""
    tc, acct = run.tc, run.acct
    fields = {"phase": now["phase"], "loss": loss, "density": now["density"], "reduction": acct.reduction()}
    run.bar.update(done, fields)
    if run.log is None:
        return
    for u in acct.new_updates():
        run.log.write({"kind": "update", **u})
    if done % tc.log_interval == 0 or done == tc.steps or done == run.start + 1:
        run.log.write({"kind": "train", "step": done, **fields, "lr": lr, "target_sparsity": now["target_sparsity"],
                       "attention": now["attention"], **acct.flops(), "tokens": acct.tokens,
                       "tokens_per_s": run.step_tokens * (done - run.start) / max(run.step_time, 1e-9)})


@torch.no_grad()
def _evaluate(run: RunState) -> dict[str, float]:
    """Mean loss on ``eval_iters`` fixed batches of each split, averaged over the ranks."""
    tc, d, module = run.tc, run.d, run.acct.module
    was = module.training
    module.eval()
    res = {}
    for split in ("train", "val"):
        total = 0.0
        for k in range(tc.eval_iters):
            x, y = run.data.batch(split, (_EVAL_KEY, k, d.rank), tc.batch_size, tc.block_size, tc.seed)
            with run.prec.autocast():
                total += lm_loss(run_model(module, run.inputs, x.to(d.device)), y.to(d.device)).item()
        res[split] = d.all_sum([total / tc.eval_iters])[0] / d.world
    module.train(was)
    return res


def _evaluate_and_log(run: RunState, done: int) -> None:
    run.last_eval = ev = _evaluate(run)
    if run.log is not None:
        run.log.write({"kind": "eval", "step": done, "phase": run.acct.phase, "train_loss": ev["train"],
                       "val_loss": ev["val"], "densities": run.acct.densities(), **run.acct.flops()})
    run.bar.note(f"step {done}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}")
    if ev["val"] < run.best:
        run.best = ev["val"]
        _checkpoint(run, done, rf.BEST)


def _checkpoint(run: RunState, step: int, name: str = rf.LAST) -> None:
    """Save the run after ``step`` as the newest checkpoint (or as best.pt); rank 0 writes. With --fsdp every
    rank joins the gather of the whole state, which rank 0 writes in the same format (train/sharded.py)."""
    bad = first_nonfinite(run.model.named_parameters(), run.d)  # every rank's shard (or replica) alike
    if bad is not None:  # a finite loss can still leave inf/NaN weights: never checkpoint them
        raise _diverged(f"weight {bad} became non-finite at step {step}", run.run_dir)
    whole = gather_state(run.acct.module, run.opt) if run.sharded else None
    mst_state = run.acct.state_dict() if run.sharded or run.d.main else None  # sharded: a collective
    if run.d.main:
        state = ckpt.make_checkpoint(step=step, model=run.model, optimizer=run.opt, mst_state=mst_state, whole=whole, extra={
            "best_val": run.best, "elapsed": run.elapsed(), "data": {"step": step, "tokens": run.acct.tokens},
            "precision": run.prec.state_dict()})
        ckpt.save_checkpoint(state, rf.checkpoints(run.run_dir), keep=run.tc.keep_checkpoints, best=name == rf.BEST)


def _finish(run: RunState) -> dict:
    """The run summary, written to summary.json by rank 0."""
    tc, acct, d = run.tc, run.acct, run.d
    summary = {
        "model": str(run.mf.path), "out": str(run.run_dir), "mode": "dense" if tc.dense else "mst", "steps": tc.steps,
        "train_loss": run.last_eval.get("train"), "val_loss": run.last_eval.get("val"), "best_val_loss": run.best,
        **acct.flops(), "reduction": acct.reduction(), "tokens": acct.tokens, "excluded": acct.excluded(),
        "final_density": acct.density(), "final_densities": acct.densities(), "world_size": d.world, "rank": d.rank,
        # DDP: every rank holds the whole model, masks and optimizer state; FSDP2: its slices of them
        "sharding": "fsdp2" if run.sharded else "ddp" if d.on else "none",
        "precision": tc.precision, "skipped_steps": run.prec.skipped,
        "wall_s": run.elapsed(),
        "step_s": run.step_time / max(1, tc.steps - run.start),  # measured training step (eval and checkpoints aside)
    }
    if run.sharded and acct.mst is not None:  # what "identical" can mean when no rank holds whole weights
        summary["ranks_identical"] = ranks_agree(acct.mst, d)
    elif d.on:
        summary["ranks_identical"] = ranks_identical(acct, run.model, d)
    if d.main:
        ckpt.write_text_atomic(run.run_dir / rf.SUMMARY, json.dumps(summary, indent=1) + "\n")
    return summary


def _diverged(what: str, run_dir: Path) -> TrainingDiverged:
    good = ckpt.last_good(rf.checkpoints(run_dir))
    where = f"; the last good checkpoint (checksum verified) is {good}" if good else ""
    return TrainingDiverged(f"{what}: stopping{where} (try a lower --lr)")


def summary_line(s: dict) -> str:
    """One line: the algorithmic FLOP count (docs/design.md §6) with the measured time beside it."""
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"
    step = f", {s['step_s']:.3g} s/step" if s.get("step_s") is not None else ""
    return (f"done: {s['steps']} steps ({s['mode']}) in {duration(s['wall_s'])}{step} | train loss {loss(s['train_loss'])} | "
            f"val loss {loss(s['val_loss'])} | algorithmic FLOPs: MST {human(s['mst_flops'])}, dense {human(s['dense_flops'])}, "
            f"reduction {s['reduction']:.2f}x | {s['out']}")
