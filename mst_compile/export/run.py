"""Export a training run folder (what ``mstc train`` writes) from its last checkpoint.

A run folder holds ``config.toml`` (the model file it trained and the resolved [train] / [mst]
tables) and ``checkpoints/last.pt`` (the model's own state_dict and the MST state: masks, step).
The model is rebuilt from the model file, the checkpoint loaded, the masks and the attention
patterns of the last step restored, and the result goes through ``export_onnx``.
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
    sm = sparsify(model, mst_cfg, example_inputs=example)
    sm.mst.load_state_dict(state["mst"])  # masks, step, and the attention patterns of that step
    return mf, model, sm, example, meta


def export_run(run_dir, output=None, *, attention: str | None = None, **export_kw: Any) -> ExportResult:
    """Export ``run_dir``'s last checkpoint to ``output`` (default ``run_dir/model.onnx``)."""
    from ..modelfile import max_sequence_length

    run_dir = rf.existing(run_dir)
    output = writable_file(output or run_dir / rf.ONNX, "export path")  # before the minutes of work
    if export_kw.get("validate", True):
        from .validate import check_provider

        check_provider(export_kw.get("provider", "cpu"))  # no onnxruntime-gpu: one line before any work
    mf, model, sm, example, meta = load_run(run_dir)
    # the captured module no longer has the model's attributes: take the limit from the model
    limit = export_kw.setdefault("max_sequence_length", max_sequence_length(model))
    check_length_limit(export_kw.get("check_lengths", ()), limit, mf.path.name + "'s model")
    return export_onnx(sm if sm is not None else model, output, example, attention=attention, metadata=meta, **export_kw)
