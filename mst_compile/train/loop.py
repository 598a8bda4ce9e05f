"""The trainer behind ``mstc train``: ``train()`` runs one model file with MST (or dense) to the end.

A step is nanoGPT's: ``grad_accum`` micro-batches of next-token cross-entropy, clip, AdamW with
linear warm-up and cosine decay. MST needs nothing more from the loop than ``sm.mst.attach(opt)``:
the runtime hooks the optimizer step and evolves the masks itself. The loop adds what a run needs
around it: deterministic data, evaluation, checkpoints that resume exactly, metrics and progress.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from ..capture import split_inputs
from ..config import MSTConfig
from ..errors import MstCompileError
from ..modelfile import ModelFile, check_unchanged, file_sha256, load_model_file, max_sequence_length
from ..paths import writable_dir
from ..runtime.schedule import lr_multiplier
from . import checkpoint as ckpt
from . import distributed
from .accounting import Accounting, ranks_identical
from .data import from_hook, load_data
from .metrics import MetricsLog, Progress, duration, human
from .options import TrainConfig, configs_for_model_file, dumps_config, read_config_file, read_model_record
from .precision import MAX_SKIPS, Precision

_EVAL_KEY = 2**40  # batch keys of evaluations never collide with training steps


class TrainingInterrupted(MstCompileError):
    """Ctrl-C (or SIGTERM): a checkpoint was saved and the run can be resumed."""


class TrainingDiverged(MstCompileError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def lr_at(step: int, tc: TrainConfig, mst: MSTConfig | None = None) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``schedule_steps``
    (``steps`` unless a resume lengthened the run; ``min_lr`` after it); an MST run whose ``lr_schedule``
    knows the phases follows ``schedule.lr_multiplier`` instead."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / (tc.warmup_steps + 1)
    if mst is not None and mst.lr_schedule != "cosine":
        return tc.lr * lr_multiplier(step, mst, tc.min_lr / tc.lr if tc.lr else 0.0)
    u = (step - tc.warmup_steps) / max(1, (tc.schedule_steps or tc.steps) - tc.warmup_steps)
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * min(u, 1.0))) * (tc.lr - tc.min_lr)


def logits_of(out) -> torch.Tensor:
    """A model may return logits, a tuple starting with them, or an output object with ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MstCompileError(f"the model returned {type(out).__name__}; expected logits (B, T, vocab) or an output with .logits")


def run_model(net, inputs, x: torch.Tensor):
    """``net`` on a (B, T) batch of token ids, passed as ``inputs`` (``ModelFile.inputs_for``) says."""
    args, kwargs = split_inputs(inputs(x))
    return net(*args, **kwargs)


def lm_loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = logits_of(out)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


class _StopRequest:
    """First Ctrl-C/SIGTERM asks the loop to checkpoint and stop after the current step; a second aborts."""

    def __init__(self):
        self.requested, self._old = False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _new_run_dir(model_file: Path, dense: bool) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{model_file.stem}{'-dense' if dense else ''}-{stamp}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def _check_out(out: str | None, resume: str | None, model_file: Path, dense: bool) -> Path:
    """The run folder; never one that holds something unless we are resuming it."""
    if resume:
        r = Path(resume)
        if not (r / "config.toml").is_file():
            raise MstCompileError(f"--resume {r}: not a run folder (no config.toml); pass the folder mstc train wrote")
        if out and Path(out).resolve() != r.resolve():
            raise MstCompileError(f"--resume {r} continues in that folder; drop --out {out}")
        return writable_dir(r, "--resume")
    if out is None:
        return writable_dir(_new_run_dir(model_file, dense), "run folder")
    o = Path(out)
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise MstCompileError(f"--out {o} already exists and is not empty; pass --resume {o} to continue that run, or choose another --out")
    return writable_dir(o, "--out")


def _absolute(spec: str | None) -> str | None:
    """A data or tokenizer path relative to the current folder, made absolute (globs too)."""
    if spec is None or Path(spec).expanduser().is_absolute():
        return spec
    return str(Path.cwd() / spec)


def load_run_config(run_dir: str | Path) -> tuple[TrainConfig, MSTConfig]:
    if not (Path(run_dir) / "config.toml").is_file():
        raise MstCompileError(f"--resume {run_dir}: not a run folder (no config.toml); pass the folder mstc train wrote")
    train, mst = read_config_file(Path(run_dir) / "config.toml")
    tc = TrainConfig(**train)
    return tc, MSTConfig.from_dict({**mst, "total_steps": tc.schedule_steps or tc.steps, "seed": tc.seed})


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
        tc, mst = load_run_config(resume)
    else:  # a new run, or a resume whose changes resume_configs accepted
        hook_tc, hook_mst = configs_for_model_file(mf, None, {}, {}) if train_config is None or mst_config is None else (None, None)
        mst, tc = mst_config or hook_mst, train_config or hook_tc
        tc = dataclasses.replace(tc, steps=tc.steps or mst.total_steps, data=_absolute(tc.data), tokenizer=_absolute(tc.tokenizer))
        mst = mst.replace(total_steps=tc.schedule_steps or tc.steps, seed=tc.seed)
    d = distributed.setup(tc.device)
    try:
        summary = _run(mf, tc, mst, d, out, resume, progress, stop_at, t_start)
        d.barrier()  # no rank tears the process group down while another still talks over it
        return summary
    finally:
        d.close()


def _run(mf, tc, mst, d, out, resume, progress, stop_at, t_start) -> dict:
    run_dir = d.broadcast(_check_out(str(out) if out else None, str(resume) if resume else None, mf.path, tc.dense) if d.main else None)
    torch.manual_seed(tc.seed)
    model = mf.model().to(d.device)
    inputs = mf.inputs_for(model)
    tc = tc.resolved(mst, max_sequence_length(model))
    limit = max_sequence_length(model)
    if limit is not None and tc.block_size > limit:
        raise MstCompileError(f"block size {tc.block_size} is larger than the model's maximum sequence length {limit}; use --block-size {limit} or less")

    # data: rank 0 tokenizes into the cache first, the others then read it
    def get_data():
        if tc.data is not None or mf.hook("data") is None:
            return load_data(tc.data, tc.tokenizer, tc.val_fraction)
        return from_hook(mf.call("data"), f"{mf.path}: data()", tc.val_fraction, tc.tokenizer)

    data = get_data() if d.main else None
    d.barrier()
    data = data or get_data()
    data.check(tc.block_size)
    B, T = tc.batch_size, tc.block_size
    x0, _ = data.batch("train", (0, 0, d.rank), B, T, tc.seed)
    _check_model_runs(model, inputs, x0[:1].to(d.device), data)

    example = mf.example_inputs() if mf.hook("example_inputs") else inputs(x0.to(d.device))
    acct = Accounting(model, mst, tc, example, x0.to(d.device), d)
    net = acct.module
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2))
    acct.attach(opt)
    prec = Precision(tc.precision, d.device)

    start, best, elapsed0 = 0, math.inf, 0.0
    if resume is not None:
        if d.main:
            ckpt.clean_temp(run_dir)  # left by writes a kill interrupted
        ck = ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt")
        ckpt.check_same_model(ck, model, run_dir / "checkpoints" / "last.pt")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        acct.load_state_dict(ck["mst"], run_dir / "checkpoints" / "last.pt")
        ckpt.set_rng_state(ck["rng"])
        prec.load_state_dict(ck.get("precision"))
        start, best, elapsed0 = ck["step"], ck["best_val"], ck["elapsed"]
        if start >= tc.steps:
            raise MstCompileError(f"--resume {run_dir}: the run already finished its {tc.steps} steps (see its summary.json); "
                                  "pass a larger --steps to train longer in the final phase")
    if d.on:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[d.device] if d.device.type == "cuda" else None)

    log = None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            check_unchanged(mf.path, read_model_record(run_dir).get("model_sha256"), run_dir)
        # the model file by absolute path and content hash: export and resume work from any folder
        ckpt.write_text_atomic(run_dir / "config.toml", dumps_config(tc, mst, str(mf.path.resolve()), file_sha256(mf.path)))
        log = MetricsLog(run_dir, keep_until_step=start if resume is not None else None)
    bar = Progress(tc.steps, start, tc.log_interval, enabled=progress and d.main)
    if d.main:
        bar.note(f"{'dense baseline' if tc.dense else 'MST'}: {mf.path} -> {run_dir} | data {data.describe()} | "
                 f"{tc.steps} steps x {B * T * tc.grad_accum * d.world:,} tokens" + (f" | resumed at step {start}" if start else ""))
        if not tc.dense and start == 0:
            _warn_regime(model, mst, tc.steps * B * T * tc.grad_accum * d.world)

    def save(step: int, name: str = "last.pt") -> None:
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:  # a finite loss can still leave inf/NaN weights: never checkpoint them
            raise _diverged(f"weight {bad} became non-finite at step {step}", run_dir)
        if d.main:
            state = ckpt.make_checkpoint(step=step, model=model, optimizer=opt, mst_state=acct.state_dict(), extra={
                "best_val": best, "elapsed": elapsed0 + time.time() - t_start, "data": {"step": step, "tokens": acct.tokens},
                "precision": prec.state_dict()})
            ckpt.save_checkpoint(state, run_dir / "checkpoints", keep=tc.keep_checkpoints, best=name == "best.pt")

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        was = acct.module.training
        acct.module.eval()
        res = {}
        for split in ("train", "val"):
            total = 0.0
            for k in range(tc.eval_iters):
                x, y = data.batch(split, (_EVAL_KEY, k, d.rank), B, T, tc.seed)
                with prec.autocast():
                    total += lm_loss(run_model(acct.module, inputs, x.to(d.device)), y.to(d.device)).item()
            res[split] = d.all_sum([total / tc.eval_iters])[0] / d.world
        acct.module.train(was)
        return res

    last_eval: dict[str, float] = {}
    step_time, step_tokens = 0.0, B * T * tc.grad_accum * d.world
    acct.module.train()
    with _StopRequest() as stop, warnings.catch_warnings():
        if (tc.schedule_steps or tc.steps) < tc.steps:  # a resume lengthened the run: the final phase is held on purpose
            warnings.filterwarnings("ignore", message="MST stepped past total_steps")
        try:
            for step in range(start, tc.steps):
                t0 = time.perf_counter()
                # what this step trains with (an update in opt.step changes it for the next one)
                now = {"phase": acct.phase, "density": acct.density(), "target_sparsity": acct.target_sparsity,
                       "attention": acct.patterns()}
                lr = lr_at(step, tc, None if tc.dense else mst)
                for g in opt.param_groups:
                    g["lr"] = lr
                for _attempt in range(MAX_SKIPS):  # fp16: a step the grad scaler skips (inf gradients) is redone
                    loss_sum = 0.0
                    for micro in range(tc.grad_accum):
                        x, y = data.batch("train", (step, micro, d.rank), B, T, tc.seed)
                        sync = net.no_sync() if d.on and micro < tc.grad_accum - 1 else contextlib.nullcontext()
                        with sync:
                            with prec.autocast():
                                loss = lm_loss(run_model(net, inputs, x.to(d.device)), y.to(d.device))
                            prec.backward(loss / tc.grad_accum)
                        loss_sum += loss.item()
                    loss_total, bad, stops = d.all_sum([loss_sum / tc.grad_accum, float(not math.isfinite(loss_sum)), float(stop.requested)])
                    loss_val = loss_total / d.world
                    if bad:  # before the optimizer step: no bad state reaches a checkpoint
                        raise _diverged(f"loss became {loss_val} at step {step + 1}", run_dir)
                    prec.unscale(opt)
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    stepped = prec.step(opt)
                    opt.zero_grad(set_to_none=True)
                    if stepped:
                        break
                else:
                    raise TrainingDiverged(f"the fp16 gradients overflowed {MAX_SKIPS} times in a row at step {step + 1} "
                                           "(the grad scaler skipped every try): use --precision bf16 or a lower --lr")
                done = step + 1
                acct.after_step(step_tokens)
                step_time += time.perf_counter() - t0
                fields = {"phase": now["phase"], "loss": loss_val, "density": now["density"], "reduction": acct.reduction()}
                bar.update(done, fields)
                if log is not None:
                    for u in acct.new_updates():
                        log.write({"kind": "update", **u})
                    if done % tc.log_interval == 0 or done == tc.steps or done == start + 1:
                        log.write({"kind": "train", "step": done, **fields, "lr": lr, "target_sparsity": now["target_sparsity"],
                                   "attention": now["attention"], **acct.flops(), "tokens": acct.tokens,
                                   "tokens_per_s": step_tokens * (done - start) / max(step_time, 1e-9)})
                if done % tc.eval_interval == 0 or done == tc.steps:
                    last_eval = evaluate()
                    if log is not None:
                        log.write({"kind": "eval", "step": done, "phase": acct.phase, "train_loss": last_eval["train"],
                                   "val_loss": last_eval["val"], "densities": acct.densities(), **acct.flops()})
                    bar.note(f"step {done}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}")
                    if last_eval["val"] < best:
                        best = last_eval["val"]
                        save(done, "best.pt")
                if done % tc.checkpoint_interval == 0 or done == tc.steps or stops or done == stop_at:
                    save(done)
                if (stops or done == stop_at) and done < tc.steps:
                    raise TrainingInterrupted(
                        f"interrupted after step {done}: checkpoint saved in {run_dir}; continue with "
                        f"mstc train {mf.path} --resume {run_dir}")
        finally:
            bar.close()
            if log is not None:
                log.close()
    summary = {
        "model": str(mf.path), "out": str(run_dir), "mode": "dense" if tc.dense else "mst", "steps": tc.steps,
        "train_loss": last_eval.get("train"), "val_loss": last_eval.get("val"), "best_val_loss": best,
        **acct.flops(), "reduction": acct.reduction(), "tokens": acct.tokens, "excluded": acct.excluded(),
        "final_densities": acct.densities(), "world_size": d.world, "rank": d.rank,
        "precision": tc.precision, "skipped_steps": prec.skipped,
        "wall_s": elapsed0 + time.time() - t_start,
        "step_s": step_time / max(1, tc.steps - start),  # measured training step (eval and checkpoints aside)
    }
    if d.on:
        summary["ranks_identical"] = ranks_identical(acct, model, d)
    if d.main:
        ckpt.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _warn_regime(model, mst: MSTConfig, tokens: int) -> None:
    """Say so when the run's tokens/param lie where the regime map found MST far from dense."""
    from ..planning import regime_warning

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    msg = regime_warning(mst, tokens / params)
    if msg:
        warnings.warn(msg, stacklevel=3)


def _diverged(what: str, run_dir: Path) -> TrainingDiverged:
    good = ckpt.last_good(run_dir / "checkpoints")
    where = f"; the last good checkpoint (checksum verified) is {good}" if good else ""
    return TrainingDiverged(f"{what}: stopping{where} (try a lower --lr)")


def _check_model_runs(model, inputs, x, data) -> None:
    """One forward on real tokens before anything is written: a wrong model is one readable line."""
    try:
        with torch.no_grad():
            logits = logits_of(run_model(model, inputs, x))
    except MstCompileError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MstCompileError(f"model() failed on a batch of token ids of shape {tuple(x.shape)}: {type(e).__name__}: {msg}") from None
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise MstCompileError(f"the model returned logits of shape {tuple(logits.shape)} for tokens {tuple(x.shape)}; expected (B, T, vocab)")
    if data.vocab_size and data.vocab_size > logits.size(-1):
        raise MstCompileError(
            f"the data has {data.vocab_size} token ids ({data.source}) but the model predicts only {logits.size(-1)}; "
            "give the model a vocabulary at least that large or use a matching --tokenizer")


def summary_line(s: dict) -> str:
    """One line: the algorithmic FLOP count (docs/design.md §6) with the measured time beside it."""
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    step = f", {s['step_s']:.3g} s/step" if s.get("step_s") is not None else ""
    return (f"done: {s['steps']} steps ({s['mode']}) in {duration(s['wall_s'])}{step} | train loss {loss(s['train_loss'])} | "
            f"val loss {loss(s['val_loss'])} | algorithmic FLOPs: MST {human(s['mst_flops'])}, dense {human(s['dense_flops'])}, "
            f"reduction {s['reduction']:.2f}x | {s['out']}")
