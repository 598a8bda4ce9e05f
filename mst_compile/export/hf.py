"""Hugging Face checkpoints: ``export_hf`` writes a folder ``AutoModelForCausalLM.from_pretrained`` loads.

The folder is the model's own ``save_pretrained`` output (safetensors + config.json) with the masks
folded into the weights (masked weights are exact zeros), plus ``mst_summary.json``: densities, the
MST config, step, phase, FLOP counts and the attention patterns the model ended training with.

Attention: a model that ended training with sparse attention gets, in config.json,
``"attn_implementation": "mst_hsa"`` and ``"mst_attention"`` (each layer's pattern and the stride it
trained with; ``integrations/hf_attention.py``). Loaded after ``import
mst_compile.integrations.transformers``, it runs those patterns in every forward and in ``generate``.
A model that ended with dense attention runs transformers' own attention and needs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..capture import inference
from ..errors import MstCompileError
from .finalize import is_sparsified, trained_attention

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


def summary_of(sm: fx.GraphModule, chosen: dict, extra: dict | None = None) -> dict[str, Any]:
    """What mst_summary.json holds for the sparsified module ``sm`` exported with ``chosen`` attention."""
    from .onnx import model_metadata

    meta = model_metadata(sm, chosen, extra)
    patterns = set(meta["attention"].values())
    meta.update({
        "format": "mst_compile.hf/1", "masks_folded": True, "step": sm.mst.step_count, "phase": sm.mst.phase,
        "flops": sm.mst.flops.as_dict(),
        "attention_at_end": "dense" if patterns <= {"dense"} else ("sparse" if len(patterns) == 1 else "mixed"),
    })
    if meta["attention_at_end"] != "dense":
        meta["attention_note"] = ("config.json selects the mst_hsa attention, which runs the trained patterns: load the "
                                  "folder after import mst_compile.integrations.transformers")
    return meta


@torch.no_grad()
def export_hf(model: nn.Module, folder, sm: fx.GraphModule | None = None, *, metadata: dict | None = None,
              block_size: int | None = None) -> Path:
    """Write ``model`` (trained in place through ``sm = sparsify(model)``) as a Hugging Face folder.

    ``sm`` supplies the masks (folded in), the attention patterns and the summary; without it the
    model is saved as it is. ``block_size``: the sequence length the model trained at, needed when a
    site with sparse attention kept the default stride (T/8); the folder keeps ``block_size // 8``.
    Returns the folder. After ``import mst_compile.integrations.transformers``,
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads it and runs the attention it trained with.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise MstCompileError(f"export_hf: {type(model).__name__} is not a Hugging Face model (no save_pretrained); "
                              "export it with mst_compile.export_onnx instead")
    entries = None
    if sm is not None:
        if not is_sparsified(sm):
            raise TypeError(f"export_hf: sm must be the module returned by mst_compile.sparsify, got {type(sm).__name__}")
        own = {id(p) for p in model.parameters()}
        foreign = [n for n, p in sm.mst.parameters().items() if id(p) not in own]
        if foreign:
            raise MstCompileError(f"export_hf: sm was not made from this model (its weights {foreign[:3]} are not the model's)")
        chosen = trained_attention(sm, block_size)
        if any(p != "dense" for p, _ in chosen.values()):
            entries = _hsa_entries(model, chosen)
        sm.mst.apply_masks()  # masked weights are exact zeros in the saved tensors
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if entries is not None:  # transformers does not save attn_implementation itself
        from ..integrations.hf_attention import CONFIG_KEY, NAME

        config = folder / "config.json"
        written = json.loads(config.read_text())
        config.write_text(json.dumps({**written, "attn_implementation": NAME, CONFIG_KEY: entries}, indent=2) + "\n")
    summary = summary_of(sm, chosen, metadata) if sm is not None else {"format": "mst_compile.hf/1", **(metadata or {})}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return folder


def _hsa_entries(model: nn.Module, chosen: dict) -> dict[str, dict]:
    """config.json's ``mst_attention`` for ``model``, once one forward has shown that every layer it names
    runs ``mst_hsa`` (a model that does not call transformers' attention interface would load the
    folder and silently run its own attention)."""
    from ..integrations import hf_attention as hsa

    entries = hsa.config_entries(model, chosen)
    config = model.config
    saved = config._attn_implementation, getattr(config, hsa.CONFIG_KEY, None)
    hsa.register()
    try:
        model.set_attn_implementation(hsa.NAME)
        setattr(config, hsa.CONFIG_KEY, entries)
        with hsa.recording() as seen, inference(model):
            model(**example_tokens(model, next(model.parameters()).device, length=16))
    finally:
        model.set_attn_implementation(saved[0])
        if saved[1] is None:
            delattr(config, hsa.CONFIG_KEY)
        else:
            setattr(config, hsa.CONFIG_KEY, saved[1])
    missing = sorted(int(k) for k in entries if int(k) not in seen)
    if missing:
        raise MstCompileError(
            f"export_hf: {type(model).__name__} does not run its attention through transformers' attention interface "
            f"(layers {missing} never called it), so a Hugging Face folder cannot carry its sparse attention; export "
            "ONNX (mstc export RUN) or load the run with mst_compile.load(RUN)")
    return entries


def export_run_hf(run_dir, folder=None) -> Path:
    """``mstc export RUN --format hf DIR``: the run's last checkpoint as a Hugging Face folder (default RUN/hf)."""
    from .run import load_run

    _, model, sm, _, meta = load_run(run_dir)
    return export_hf(model, folder or Path(run_dir) / "hf", sm, metadata=meta, block_size=meta["train_config"]["block_size"])


def read_summary(folder) -> dict[str, Any]:
    path = Path(folder) / SUMMARY
    if not path.is_file():
        raise MstCompileError(f"{folder} has no {SUMMARY}: it was not written by mst_compile.export.export_hf")
    return json.loads(path.read_text())
