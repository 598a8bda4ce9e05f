"""A training run folder (what ``mstc train`` writes) from its last checkpoint: ``load`` (the
trained model in PyTorch) and ``export_run`` (ONNX).

A run folder holds ``config.toml`` (the model file it trained and the resolved [train] / [mst]
tables) and ``checkpoints/last.pt`` (the model's own state_dict and the MST state: masks, step).
The model is rebuilt from the model file, the checkpoint loaded, and the masks and the attention
patterns of the last step restored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import run_folder as rf
from ..errors import MstCompileError
from ..paths import writable_file
from .finalize import finalize, pinned, trained_attention
from .onnx import ExportResult, export_onnx
from .validate import check_length_limit


def _model_path(run_dir: Path, doc: dict) -> Path:
    """The model file a run trained: recorded by absolute path (older runs: relative to where they ran)."""
    from ..modelfile import check_unchanged

    name = doc.get("model")
    if not name:
        raise MstCompileError(f"{rf.config_file(run_dir)} does not name the model file it trained (no 'model' key)")
    p = Path(name)
    for cand in ([p] if p.is_absolute() else [p, run_dir / p, run_dir.parent / p]):
        if cand.is_file():
            check_unchanged(cand, doc.get("model_sha256"), run_dir)
            return cand
    raise MstCompileError(
        f"the run's model file {name} is not found (looked from {Path.cwd()} and beside {run_dir}); "
        "put the model file back at that path, or pass it explicitly: mstc train MODEL --resume RUN_DIR"
    )


def _example(mf, model: nn.Module, block_size: int | None):
    """The model file's example_inputs(), else a batch of token ids like the ones it trained on, passed
    the way the trainer passes them."""
    if mf.hook("example_inputs") is not None:
        return mf.example_inputs()
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    vocab = emb.num_embeddings if emb is not None else 256
    tokens = torch.randint(0, vocab, (2, block_size or 128), generator=torch.Generator().manual_seed(0))
    return mf.inputs_for(model)(tokens)


def load_run(run_dir) -> tuple[Any, nn.Module, torch.fx.GraphModule | None, Any, dict]:
    """Rebuild ``run_dir``'s model from its model file and last checkpoint (checksum verified).

    Returns ``(model_file, model, sm, example_inputs, metadata)``: ``sm`` is the sparsified module
    with the masks and attention patterns of the last step (None for a dense baseline).
    """
    from ..api import sparsify
    from ..modelfile import load_model_file

    run_dir = rf.existing(run_dir)
    last = rf.last_checkpoint(run_dir)
    tc, mst_cfg = rf.load_run_config(run_dir)
    mf = load_model_file(_model_path(run_dir, tomllib.loads(rf.config_file(run_dir).read_text())))
    model = mf.model()
    ck = ckpt.load_checkpoint(last)
    ckpt.check_same_model(ck, model, last)
    model.load_state_dict(ck["model"])
    example = _example(mf, model, tc.block_size)
    state = ck.get("mst") or {}
    meta = {"train_config": dataclasses.asdict(tc),
            "run": {"folder": str(run_dir.resolve()), "step": int(ck["step"]), "model_file": str(mf.path)}}
    if state.get("dense") or state.get("mst") is None:  # the dense baseline: a plain model
        meta["config"] = mst_cfg.to_dict()
        return mf, model, None, example, meta
    sm = sparsify(model, mst_cfg, total_steps=tc.schedule_steps or tc.steps, seed=tc.seed, example_inputs=example)
    sm.mst.load_state_dict(state["mst"])  # masks, step, and the attention patterns of that step
    return mf, model, sm, example, meta


def load(run_dir) -> nn.Module:
    """The model ``run_dir`` trained, as it trained, in eval mode: ``mst_compile.load(RUN_DIR)``.

    An MST run gives ``finalize`` of its last step: plain ops with the masks folded into the weights,
    each attention site with the pattern and stride it trained with at the end (a default stride is
    fixed at the run's block_size / 8, so every query attends the keys it attended in training at any
    length). It takes the inputs the model file's model takes. A dense baseline run gives the model
    itself.
    """
    _, model, sm, _, meta = load_run(run_dir)
    if sm is None:
        return model.eval()
    with pinned(sm, trained_attention(sm, meta["train_config"]["block_size"])):
        return finalize(sm).eval()


def export_run(run_dir, output=None, *, attention: str | None = None, **export_kw: Any) -> ExportResult:
    """Export ``run_dir``'s last checkpoint to ``output`` (default ``run_dir/model.onnx``)."""
    from ..modelfile import max_sequence_length

    run_dir = rf.existing(run_dir)
    output = writable_file(output or run_dir / rf.ONNX, "export path")  # before the minutes of work
    if export_kw.get("validate", True):
        from .validate import check_provider

        check_provider(export_kw.get("provider", "cpu"))  # no onnxruntime-gpu: one line before any work
    mf, model, sm, example, meta = load_run(run_dir)
    lengths = export_kw.get("check_lengths", ())
    # the captured module no longer has the model's attributes: take the limit from the model
    limit = export_kw.get("max_sequence_length") or max_sequence_length(model)
    if limit is None:  # the model names it otherwise, or has none: find it by running the model
        limit, meta["max_sequence_length_note"] = _probed_limit(mf, model, example, meta["train_config"]["block_size"], lengths)
    export_kw["max_sequence_length"] = limit
    check_length_limit(lengths, limit, mf.path.name + "'s model")
    return export_onnx(sm if sm is not None else model, output, example, attention=attention, metadata=meta, **export_kw)


@torch.no_grad()
def _probed_limit(mf, model: nn.Module, example, block_size: int, lengths) -> tuple[int | None, str]:
    """The longest sequence the model runs, found by running it (batch 1) at increasing lengths up to
    8x the training length (or the longest length to check); None when it ran at all of them."""
    import warnings

    from ..capture import inference
    from .onnx import call_model, model_inputs
    from .validate import probe_limit, random_like

    io = model_inputs(model, example)
    gen = torch.Generator().manual_seed(0)

    def runs(T: int) -> bool:
        xs = [random_like(x, 1, T if x.dim() >= 3 or (x.dim() == 2 and not x.dtype.is_floating_point) else None, gen)
              for x in io.examples]  # the sequence axes export_onnx makes dynamic
        try:
            with inference(model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call_model(model, io, xs)
        except Exception:  # an index past the position table, a shape guard, ...: not at this length
            return False
        return True

    cap = max([8 * block_size, *lengths])
    found = probe_limit(runs, block_size, cap)
    if found is None:
        return None, f"unknown: {mf.path.name}'s model names no maximum and ran at every length probed up to {cap}"
    return found, f"found by running {mf.path.name}'s model: it runs at {found} tokens, not at {found + 1}"
