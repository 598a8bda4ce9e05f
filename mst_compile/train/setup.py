"""Everything a training run holds, and how ``train()`` builds it before the first step.

``setup`` does, in this order (the order fixes what the seeded RNG draws, so a run is reproducible):
the run folder, the model under ``seed``, the data (its token ids checked against the model's
input embedding before any forward), the sparsified (or captured) module with its accounting (with
``--fsdp``: captured per block and sharded, ``train/sharded.py``), the optimizer, and on ``--resume``
the state of the last checkpoint. ``RunState`` is what the loop's
step, evaluation and checkpoint functions share.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from .. import run_folder as rf
from ..config import MSTConfig
from ..errors import CaptureError, MstCompileError
from ..modelfile import ModelFile, check_unchanged, file_sha256, input_embedding, max_sequence_length, parameter_count
from ..paths import writable_dir
from .accounting import Accounting, build
from .data import from_hook, load_data
from .metrics import MetricsLog, Progress
from .options import TrainConfig, dumps_config, read_model_record
from .precision import Precision
from .sharded import check_blocks, load_state, parameter_names, refuse_options, shard
from .steps import check_model_runs, embedding_too_small


@dataclass(eq=False)
class RunState:
    """One run while it trains: what it was built from, what it trains, and where it stands."""

    mf: ModelFile
    tc: TrainConfig
    mst: MSTConfig
    d: Any  # distributed.Dist: rank, world, device and the collectives
    run_dir: Path
    model: torch.nn.Module  # the user's model (its parameters are the ones trained); under --fsdp sm, which holds the DTensors
    inputs: Any  # ModelFile.inputs_for(model): how a (B, T) batch of token ids is passed
    data: Any
    acct: Accounting  # the trained module and its figures
    net: torch.nn.Module  # what the step calls: acct.module, wrapped in DDP when distributed (sharded by FSDP2 with --fsdp)
    opt: torch.optim.Optimizer
    prec: Precision
    t_start: float  # time.time() when train() was called
    start: int = 0  # the step this process starts at (resume: the checkpoint's)
    best: float = math.inf  # lowest validation loss so far
    elapsed0: float = 0.0  # wall time spent before a resume
    step_time: float = 0.0  # measured training-step time since start (evaluation and checkpoints aside)
    last_eval: dict[str, float] = field(default_factory=dict)
    log: MetricsLog | None = None  # rank 0 only
    bar: Progress | None = None
    param_names: list[str] | None = None  # --fsdp --resume: the optimizer's parameters by name (sharded.load_state)

    @property
    def step_tokens(self) -> int:
        return self.tc.batch_size * self.tc.block_size * self.tc.grad_accum * self.d.world

    @property
    def sharded(self) -> bool:
        """FSDP2 (``--fsdp``): each rank holds slices of the parameters, optimizer state and masks."""
        return self.tc.fsdp

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self.t_start


def setup(mf: ModelFile, tc: TrainConfig, mst: MSTConfig, d, *, out, resume, progress: bool, t_start: float) -> RunState:
    """Build the run (see the module docstring); nothing is trained yet."""
    if tc.fsdp:
        refuse_options(tc, mst)
    run_dir = d.broadcast(_check_out(str(out) if out else None, str(resume) if resume else None, mf.path, tc.dense) if d.main else None)
    torch.manual_seed(tc.seed)
    model = mf.model().to(d.device)
    inputs = mf.inputs_for(model)
    blocks = check_blocks(model) if tc.fsdp else "auto"  # --fsdp names the path: no fallback to a whole capture
    tc = tc.resolved(mst, max_sequence_length(model))
    limit = max_sequence_length(model)
    if limit is not None and tc.block_size > limit:
        raise MstCompileError(f"block size {tc.block_size} is larger than the model's maximum sequence length {limit}; use --block-size {limit} or less")

    data = _data(mf, tc, d)
    _check_vocabulary(model, data)
    B, T = tc.batch_size, tc.block_size
    x0, _ = data.batch("train", (0, 0, d.rank), B, T, tc.seed)
    check_model_runs(model, inputs, x0[:1].to(d.device), data)

    example = mf.capture_inputs(model, x0.to(d.device))
    try:
        acct = build(model, mst, tc, example, inputs(x0.to(d.device)), d, blocks=blocks)
    except CaptureError as e:
        raise mf.capture_error(e) from None
    if tc.fsdp:  # FSDP2 registers its DTensors in sm's modules, which are not all the model's (a block cut from an
        shard(acct.module, d.device)  # exported graph has modules of its own): from here on sm stands for the model
        model = acct.module  # (the same parameter names, in the same order)
    opt = torch.optim.AdamW(_param_groups(model, tc, acct), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    names = parameter_names(acct.module, opt) if tc.fsdp and resume is not None else None  # before attach (its docstring)
    acct.attach(opt)
    run = RunState(mf=mf, tc=tc, mst=mst, d=d, run_dir=run_dir, model=model, inputs=inputs, data=data, acct=acct,
                   net=acct.module, opt=opt, prec=Precision(tc.precision, d.device), t_start=t_start, param_names=names)
    if resume is not None:
        _restore(run)
    if d.on and not tc.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.net = DDP(run.net, device_ids=[d.device] if d.device.type == "cuda" else None)
    _open_folder(run, resume is not None, progress)
    return run


def _data(mf: ModelFile, tc: TrainConfig, d):
    """The token data: rank 0 tokenizes into the cache first, the others then read it."""
    options = {"data_dtype": tc.data_dtype, "text_field": tc.text_field}

    def get():
        if tc.data is not None or mf.hook("data") is None:
            return load_data(tc.data, tc.tokenizer, tc.val_fraction, **options)
        return from_hook(mf.call("data"), f"{mf.path}: data()", tc.val_fraction, tc.tokenizer, **options)

    data = get() if d.main else None
    d.barrier()
    data = data or get()
    data.check(tc.block_size)
    return data


def _check_vocabulary(model: torch.nn.Module, data) -> None:
    """Every token id of the data needs a row of the model's input embedding. Checked here, before any
    forward: a larger id fails deep inside it (``IndexError: index out of range in self``)."""
    ids = data.id_range()  # None for get_batch data: check_model_runs guards its first batch
    if ids is None:
        return
    lo, hi = ids
    if lo < 0:
        raise MstCompileError(f"the data holds the negative token id {lo} ({data.origin()}); token ids start at 0")
    emb = input_embedding(model)
    if emb is not None and hi >= emb[1]:
        raise embedding_too_small(f"the data's largest token id is {hi} ({data.origin()})", hi, *emb)


def _param_groups(model, tc: TrainConfig, acct) -> list[dict]:
    """Weight decay on the matrices, none on the rest; under ``MSTConfig.lr_density_scope="weight"`` each
    sparse weight in a group of its own, named by ``"mst_weight"``, whose lr the loop scales by its density."""
    scaled = set(acct.lr_scales())
    own = {id(p): n for n, p in acct.module.named_parameters() if n in scaled}  # the sparse weights by object
    params = [p for p in model.parameters() if p.requires_grad]
    found = {own[id(p)] for p in params if id(p) in own}
    if found != scaled:  # every scaled weight must reach the optimizer, or its lr would silently stay put
        raise MstCompileError(f"lr_density_scope='weight': the sparse weights {sorted(scaled - found)} are not trained "
                              "parameters of the model; use lr_density_scope='run'")
    decay = [p for p in params if p.dim() >= 2 and id(p) not in own]
    rest = [p for p in params if p.dim() < 2 and id(p) not in own]
    return ([{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
            + [{"params": [p], "weight_decay": tc.weight_decay, "mst_weight": own[id(p)]} for p in params if id(p) in own])


def _restore(run: RunState) -> None:
    """Continue from the run folder's last checkpoint: weights, optimizer, MST, RNG, position."""
    if run.d.main:
        ckpt.clean_temp(run.run_dir)  # left by writes a kill interrupted
    last = rf.last_checkpoint(rf.existing(run.run_dir))  # none yet: says how to start the run again
    ck = ckpt.load_checkpoint(last)
    ckpt.check_same_model(ck, run.model, last)
    if run.sharded:  # every rank holds the whole checkpoint and keeps its slices
        load_state(run.acct.module, run.opt, ck["model"], ck["optimizer"], run.param_names)
    else:
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
    run.acct.load_state_dict(ck["mst"], last)
    ckpt.set_rng_state(ck["rng"])
    run.prec.load_state_dict(ck.get("precision"))
    run.start, run.best, run.elapsed0 = ck["step"], ck["best_val"], ck["elapsed"]
    if run.start >= run.tc.steps:
        raise MstCompileError(f"--resume {run.run_dir}: the run already finished its {run.tc.steps} steps (see its summary.json); "
                              "pass a larger --steps to train longer in the final phase")


def _open_folder(run: RunState, resumed: bool, progress: bool) -> None:
    """Rank 0 writes config.toml and opens metrics.jsonl; every rank gets its progress bar."""
    mf, tc, d, run_dir = run.mf, run.tc, run.d, run.run_dir
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            check_unchanged(mf.path, read_model_record(run_dir).get("model_sha256"), run_dir)
        # the model file by absolute path and content hash: export and resume work from any folder
        ckpt.write_text_atomic(rf.config_file(run_dir), dumps_config(tc, run.mst, str(mf.path.resolve()), file_sha256(mf.path)))
        run.log = MetricsLog(run_dir, keep_until_step=run.start if resumed else None)
    run.bar = Progress(tc.steps, run.start, tc.log_interval, enabled=progress and d.main)
    if d.main:
        run.bar.note(f"{'dense baseline' if tc.dense else 'MST'}: {mf.path} -> {run_dir} | data {run.data.describe()} | "
                     f"{tc.steps} steps x {run.step_tokens:,} tokens" + (f" | resumed at step {run.start}" if run.start else ""))
        if not tc.dense and not resumed:
            note = _regime_note(run.model, run.mst, tc.steps * run.step_tokens)
            if note:  # part of the start-up output: once, on rank 0, not under --quiet
                run.bar.note(f"note: {note}")


def _regime_note(model, mst: MSTConfig, tokens: int) -> str | None:
    """A note when the run's tokens/param lie where the regime map found MST far from dense."""
    from ..regime import regime_note

    return regime_note(mst, tokens / parameter_count(model))


def _new_run_dir(model_file: Path, dense: bool) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(rf.RUNS) / f"{model_file.stem}{'-dense' if dense else ''}-{stamp}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def _check_out(out: str | None, resume: str | None, model_file: Path, dense: bool) -> Path:
    """The run folder; never one that holds something unless we are resuming it."""
    if resume:
        r = Path(resume)
        if not rf.config_file(r).is_file():
            raise MstCompileError(f"--resume {r}: not a run folder (no {rf.CONFIG}); pass the folder mstc train wrote")
        if out and Path(out).resolve() != r.resolve():
            raise MstCompileError(f"--resume {r} continues in that folder; drop --out {out}")
        return writable_dir(r, "--resume")
    if out is None:
        return writable_dir(_new_run_dir(model_file, dense), "run folder")
    o = Path(out)
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise MstCompileError(f"--out {o} already exists and is not empty; pass --resume {o} to continue that run, or choose another --out")
    return writable_dir(o, "--out")
