"""MST inside a Hugging Face ``Trainer``: ``Trainer(model=..., callbacks=[MSTCallback(MSTConfig(...))])``.

How the sparse kernels and the sparse attention get into the Trainer's training: at train begin the
callback captures the Trainer's model with ``sparsify`` (the captured module ``sm`` shares every
parameter with the model) and replaces the model's ``forward`` (on that one instance) by a call to
``sm``. The Trainer, and DDP around it, still call ``model(**inputs)``, but every step now runs the
mask-carrying sparse ops and the hybrid sparse attention; the language-model loss is the model's own
``loss_function``, so the loss is what the model would compute. MST is attached to the Trainer's
(inner) ``torch.optim.Optimizer``: its step hook runs only when the optimizer really stepped, so a
step skipped by a loss scaler does not advance MST. At train end the model's own forward comes back
(its weights hold the final sparse values).

Checkpoints: ``checkpoint-N/mst_state.pt`` holds ``sm.mst.state_dict()`` (masks, schedule position,
random generator, FLOP ledger); ``trainer.train(resume_from_checkpoint=...)`` restores it, so a
resumed run equals the uninterrupted one.

Learning rate: with ``lr_density_power`` (on by default) the callback multiplies the Trainer scheduler's
learning rate of each step by ``sm.mst.lr_scale()`` just before the optimizer steps (``mstc train``'s rule);
the Trainer's logged ``learning_rate`` is the scheduler's, ``mst_lr_scale`` the factor on top of it.

Logs: every ``on_log`` adds ``mst_phase``, ``mst_density``, ``mst_lr_scale``, ``mst_target_sparsity``, ``mst_flops``,
``mst_dense_flops`` and ``mst_flop_reduction`` (all ranks together) to the logs and to
``trainer.state.log_history``. Reporters that ``report_to`` adds run before the callbacks given to
``Trainer(callbacks=...)``; to have TensorBoard or W&B record MST's numbers, list the reporter after
MSTCallback: ``callbacks=[MSTCallback(cfg), TensorBoardCallback()]`` with ``report_to="none"``.

Importing this module also registers the ``mst_hsa`` attention with transformers (``hf_attention``),
which the folders ``export_hf`` writes for models trained with sparse attention name in config.json.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..api import as_config, sparsify
from ..config import MSTConfig
from ..errors import CaptureError, CheckpointError, MstCompileError
from ..export.hf import example_tokens
from . import hf_attention

hf_attention.register()  # attn_implementation="mst_hsa": exported folders run the attention they trained with

STATE_FILE = "mst_state.pt"  # in each checkpoint-N/ folder the Trainer writes


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside the Trainer's optimizer (accelerate wraps it)."""
    inner = optimizer
    while type(inner).__name__ == "AcceleratedOptimizer":  # accelerate.optimizer.AcceleratedOptimizer
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise MstCompileError(
            f"MSTCallback: the Trainer's optimizer is a {type(inner).__name__}, not a torch.optim.Optimizer; MST "
            "hooks the optimizer's step. Pass a torch optimizer with Trainer(optimizers=(optimizer, scheduler)), "
            "or train with your own loop and drive MST with sm.mst.attach(None) and sm.mst.step()")
    return inner


def _refuse_sharded_trainer(args) -> None:
    """FSDP or DeepSpeed asked of the Trainer (its arguments, or accelerate's launcher): one line, before any capture."""
    seen = None
    if getattr(args, "fsdp", None):
        seen = f"TrainingArguments.fsdp={args.fsdp!r}"
    elif getattr(args, "deepspeed", None):
        seen = f"TrainingArguments.deepspeed={args.deepspeed!r}"
    else:
        for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
            if os.environ.get(var, "").lower() in ("1", "true", "yes"):
                seen = f"{var}={os.environ[var]} (accelerate launch with an FSDP or DeepSpeed config)"
                break
    if seen is not None:
        from ..runtime.sharding import SUPPORTED

        raise MstCompileError(f"MSTCallback: the Trainer is set to shard the model ({seen}); MSTCallback supports DDP "
                              "only: drop fsdp/deepspeed from the Trainer's arguments and launch with torchrun for DDP "
                              f"(in your own loop, {SUPPORTED})")


def closed_form_scheduler(scheduler: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The Trainer's scheduler (accelerate wraps it) when it computes each step's LR from the step alone, as every
    ``transformers`` schedule but reduce-on-plateau does: only then can the callback scale the LR of a step without
    the scaling feeding into the next one."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate.scheduler.AcceleratedScheduler
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        raise MstCompileError(
            f"MSTCallback: MSTConfig.lr_density_power scales the learning rate of each step, which needs a scheduler "
            f"that computes it from the step alone (a LambdaLR, as transformers' lr_scheduler_type values but "
            f"reduce_lr_on_plateau are); the Trainer has a {type(inner).__name__}: use such a scheduler, or "
            f"MSTConfig(lr_density_power=0)")
    return inner


class MSTCallback(TrainerCallback):
    """Runs Mixed Sparsity Training inside ``transformers.Trainer``.

    ``config``: the MST recipe (the run's length is the Trainer's ``max_steps``). ``seed``: of MST's
    random growth.
    ``example_inputs``: keyword inputs to capture the model with (default: token ids of the model's
    vocabulary). ``filter_fn(module, fqn)``: False keeps that module's weights dense.
    ``resume_from``: the checkpoint folder to restore MST from when the Trainer resumes from a folder
    that is not ``output_dir/checkpoint-N``. After training, ``callback.sm`` is the sparsified
    module (``mst_compile.export.export_hf(model, folder, callback.sm, block_size=T)`` writes an HF checkpoint).
    """

    def __init__(self, config: MSTConfig | dict | None = None, *, seed: int = 0, example_inputs: dict | None = None,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None, resume_from: str | os.PathLike | None = None):
        self.config, self.seed = as_config(config), seed
        if self.config.lr_density_power != 0 and self.config.lr_density_scope == "weight":  # one group per weight
            raise ValueError("MSTCallback: MSTConfig.lr_density_scope='weight' is not supported: it needs a param group "
                             "per sparse weight, which the Trainer's optimizer does not have; use lr_density_scope='run' "
                             "here, or mstc train / your own loop with sm.mst.lr_scales()")
        if example_inputs is not None and not isinstance(example_inputs, dict):
            raise TypeError(f"MSTCallback(example_inputs=...) must be a dict of keyword inputs like "
                            f"{{'input_ids': tokens}}, got {type(example_inputs).__name__}")
        self.example_inputs, self.filter_fn, self.resume_from = example_inputs, filter_fn, resume_from
        self.sm: torch.fx.GraphModule | None = None
        self._model: nn.Module | None = None
        self._world = 1
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # set when the LR follows the density

    # -- train begin: capture, attach, restore, take over the forward ----------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if model is None:
            raise MstCompileError("MSTCallback: the Trainer passed no model to on_train_begin")
        _refuse_sharded_trainer(args)
        opt = torch_optimizer(optimizer)  # checked before anything is captured or changed
        self._scheduler = closed_form_scheduler(lr_scheduler) if self.config.lr_density_power != 0 else None
        device = next(model.parameters()).device
        example = self.example_inputs or example_tokens(model, device)
        try:
            with torch.random.fork_rng(devices=[]):  # capture draws nothing from the Trainer's generator
                sm = sparsify(model, self.config, total_steps=int(state.max_steps), seed=self.seed,
                              example_inputs=example, filter_fn=self.filter_fn)
        except CaptureError as e:
            raise CaptureError(f"MSTCallback: {e}") from None
        sm.to(device)
        if state.global_step > 0:  # resuming: the masks and schedule of that checkpoint, before attach
            sm.mst.load_state_dict(self._load_state(args, state))
        sm.mst.attach(opt)
        self.sm, self._model, self._world = sm, model, max(1, int(getattr(args, "world_size", 1) or 1))
        self._take_over_forward(model, sm, example)

    def _load_state(self, args, state) -> dict:
        step_dir = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        where = [Path(self.resume_from)] if self.resume_from is not None else [Path(args.output_dir) / step_dir]
        for folder in where:
            if (folder / STATE_FILE).is_file():
                return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        raise CheckpointError(
            f"MSTCallback: the Trainer resumes at step {state.global_step} but {where[0] / STATE_FILE} does not exist "
            "(the checkpoint was written without MSTCallback, or lies elsewhere: pass MSTCallback(..., "
            "resume_from='path/to/checkpoint-N'))")

    def _take_over_forward(self, model: nn.Module, sm: torch.fx.GraphModule, example: dict) -> None:
        names = list(example)
        own = model.forward
        self._own_forward = model.__dict__.get("forward")  # an instance-level forward, if the model had one

        @functools.wraps(own)  # keeps the signature the Trainer inspects for its input columns
        def forward(*args, labels=None, attention_mask=None, num_items_in_batch=None, **kw):
            if attention_mask is not None and not bool(attention_mask.all()):
                raise MstCompileError(
                    "MSTCallback: a batch has padding (attention_mask with zeros); MST trains the captured model "
                    "on full token blocks: pack the text into fixed-length blocks (no padding)")
            inputs = dict(zip(names, args))
            extra = sorted(k for k, v in kw.items() if k not in names and v is not None and v is not False)
            if extra:
                raise MstCompileError(f"MSTCallback: the model was captured with inputs {names}; the Trainer also "
                                      f"passed {extra}, which the captured model cannot take")
            inputs.update({k: v for k, v in kw.items() if k in names})
            sm.train(model.training)
            from ..modelfile import logits_of

            logits = logits_of(sm(**inputs))  # (B, T, vocab)
            loss = None
            if labels is not None:
                loss_fn = getattr(model, "loss_function", None)
                if loss_fn is None:
                    raise MstCompileError(f"MSTCallback: {type(model).__name__} has no loss_function; give the "
                                          "Trainer a compute_loss_func or a Hugging Face causal LM")
                loss = loss_fn(logits=logits, labels=labels, vocab_size=logits.size(-1),
                               num_items_in_batch=num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

        model.forward = forward

    # -- during training ------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """The learning rate follows the density (``lr_density_power``): the scheduler's value of this step times
        ``sm.mst.lr_scale()``, set just before the step. Idempotent (a step a loss scaler skips leaves the group at
        the scaled value, set again from the scheduler next time); the scheduler's next step writes its own value back."""
        if self.sm is None or self._scheduler is None:
            return
        scale = self.sm.mst.lr_scale()
        for g, lr in zip(torch_optimizer(optimizer).param_groups, self._scheduler.get_last_lr(), strict=True):
            g["lr"] = float(lr) * scale

    def metrics(self) -> dict[str, Any]:
        """MST's numbers now: phase, density, the LR factor, target sparsity and cumulative FLOPs of all ranks."""
        mst = self.sm.mst
        f = mst.flops
        return {"mst_phase": mst.phase, "mst_density": float(mst.density()), "mst_lr_scale": float(mst.lr_scale()),
                "mst_target_sparsity": float(mst.target_sparsity), "mst_flops": float(f.mst_total) * self._world,
                "mst_dense_flops": float(f.dense_total) * self._world, "mst_flop_reduction": float(f.reduction)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sm is None or logs is None:
            return
        m = self.metrics()
        logs.update(m)
        if state.log_history:
            state.log_history[-1].update(m)

    def on_save(self, args, state, control, **kwargs):
        if self.sm is None or not state.is_world_process_zero:
            return
        from ..checkpoint import save_atomic

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            save_atomic(self.sm.mst.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.sm is None:
            return
        self.sm.mst.detach()  # masks and weights stay; the hooks go
        if self._own_forward is not None:
            self._model.forward = self._own_forward
        else:
            del self._model.forward  # the model's own forward again, on the final sparse weights
