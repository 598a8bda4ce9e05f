"""Hugging Face checkpoints: ``export_hf`` writes a folder ``AutoModelForCausalLM.from_pretrained`` loads.

The folder is the model's own ``save_pretrained`` output (safetensors + config.json) with the masks
folded into the weights (masked weights are exact zeros), plus ``mst_summary.json``: densities, the
MST config, step, phase, FLOP counts and the attention patterns the model ended training with.

Attention: a model that ended training with dense causal attention (the default recipe: sparse
attention only in the ultra phase) loads and generates as it was trained. A model that ended with
a sparse pattern says so in the summary (``"attention_at_end": "sparse"``); the plain HF model runs
dense attention, and ``with_trained_attention(model, folder)`` gives back a module that runs the
loaded model with the recorded patterns (forward only: logits for a batch of token ids).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import MstCompileError
from .finalize import finalize, is_sparsified, resolve_attention

SUMMARY = "mst_summary.json"


def example_tokens(model: nn.Module, device: torch.device | str = "cpu", length: int = 64) -> dict[str, torch.Tensor]:
    """Token ids of the model's vocabulary to capture with (a local generator: global RNG untouched)."""
    from ..modelfile import max_sequence_length as _model_block_size

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        vocab = emb.num_embeddings if emb is not None else 256
    T = min(_model_block_size(model) or length, length)
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (2, T), generator=g).to(device)}  # (2, T)


def summary_of(sm: fx.GraphModule, extra: dict | None = None) -> dict[str, Any]:
    """What mst_summary.json holds for the sparsified module ``sm``."""
    from .onnx import _metadata

    meta = _metadata(sm, resolve_attention(sm, None), extra)
    patterns = set(meta["attention"].values())
    meta.update({
        "format": "mst_compile.hf/1", "masks_folded": True, "step": sm.mst.step_count, "phase": sm.mst.phase,
        "flops": sm.mst.flops.as_dict(),
        "attention_at_end": "dense" if patterns <= {"dense"} else ("sparse" if len(patterns) == 1 else "mixed"),
    })
    if meta["attention_at_end"] != "dense":
        meta["attention_note"] = ("trained to the end with sparse attention; the Hugging Face model runs dense "
                                  "attention: mst_compile.export.with_trained_attention(model, folder) re-applies it")
    return meta


@torch.no_grad()
def export_hf(model: nn.Module, folder, sm: fx.GraphModule | None = None, *, metadata: dict | None = None) -> Path:
    """Write ``model`` (trained in place through ``sm = sparsify(model)``) as a Hugging Face folder.

    ``sm`` supplies the masks (folded in) and the summary; without it the model is saved as it is.
    Returns the folder. ``AutoModelForCausalLM.from_pretrained(folder)`` loads it.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise MstCompileError(f"export_hf: {type(model).__name__} is not a Hugging Face model (no save_pretrained); "
                              "export it with mst_compile.export_onnx instead")
    if sm is not None:
        if not is_sparsified(sm):
            raise TypeError(f"export_hf: sm must be the module returned by mst_compile.sparsify, got {type(sm).__name__}")
        own = {id(p) for p in model.parameters()}
        foreign = [n for n, p in sm.mst.parameters().items() if id(p) not in own]
        if foreign:
            raise MstCompileError(f"export_hf: sm was not made from this model (its weights {foreign[:3]} are not the model's)")
        sm.mst.apply_masks()  # masked weights are exact zeros in the saved tensors
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    summary = summary_of(sm, metadata) if sm is not None else {"format": "mst_compile.hf/1", **(metadata or {})}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return folder


def export_run_hf(run_dir, folder=None) -> Path:
    """``mstc export RUN --format hf DIR``: the run's last checkpoint as a Hugging Face folder (default RUN/hf)."""
    from .run import load_run

    _, model, sm, _, meta = load_run(run_dir)
    return export_hf(model, folder or Path(run_dir) / "hf", sm, metadata=meta)


def read_summary(folder) -> dict[str, Any]:
    path = Path(folder) / SUMMARY
    if not path.is_file():
        raise MstCompileError(f"{folder} has no {SUMMARY}: it was not written by mst_compile.export.export_hf")
    return json.loads(path.read_text())


def with_trained_attention(model: nn.Module, folder, example_inputs: Any = None) -> fx.GraphModule:
    """A module running the loaded ``model`` with the attention patterns ``folder``'s summary recorded.

    It shares the model's parameters and takes what the model was captured with (token ids by
    default: ``module(input_ids=ids)``); it computes the strided and local patterns without a dense mask.
    """
    from ..api import sparsify
    from ..config import MSTConfig

    summary = read_summary(folder)
    cfg = MSTConfig.from_dict(summary["config"])
    device = next(model.parameters()).device
    sm = sparsify(model, cfg, example_inputs=example_inputs or example_tokens(model, device))
    strides = {n: None if s == "T/8" else s for n, s in summary["stride"].items()}
    for site, pattern in summary["attention"].items():
        sm.mst.set_attention({site: pattern}, stride=strides.get(site))
    return finalize(sm)
