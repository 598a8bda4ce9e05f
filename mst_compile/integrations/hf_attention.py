"""Hybrid sparse attention inside Hugging Face models: the ``mst_hsa`` attention implementation.

A folder written by ``mst_compile.export.export_hf`` from a model trained with sparse attention has,
in its config.json, ``"attn_implementation": "mst_hsa"`` and ``"mst_attention"``: per decoder layer
(``layer_idx``) the pattern and the stride it trained with. ``register()`` (run when
``mst_compile.integrations.transformers`` is imported) adds ``mst_hsa`` to transformers'
``AttentionInterface``, so ``AutoModelForCausalLM.from_pretrained(folder)`` builds the model with it
and every forward and ``generate`` runs each layer's pattern:

- a whole sequence without padding: ``hsa_attention``, the kernels that skip the masked work;
- the new tokens of a KV cache (decoding), or a batch with padding: masked dense SDPA over the
  pattern at the tokens' absolute positions (``hsa_attention_cached``).

The pattern depends only on the distance between query and key (the stride is fixed at export), so
decoding with the cache gives what re-running the whole sequence gives. Layers without an entry, or
with ``dense``, run transformers' own SDPA attention. Caches that keep the queries anywhere but at
the end of the keys (a static cache) are refused in one line.
"""
from __future__ import annotations

import contextlib

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..constants import ATTENTION_PATTERNS
from ..errors import MstCompileError
from ..ops.attention import hsa_attention_cached

NAME = "mst_hsa"  # the attn_implementation config.json names
CONFIG_KEY = "mst_attention"  # config.json: {"<layer_idx>": {"pattern": ..., "stride": ...}}

_SEEN: list[set[int] | None] = [None]  # layers that ran mst_hsa, while ``recording()`` is active


def _site(module: nn.Module) -> dict | None:
    """This layer's entry of the config's ``mst_attention`` (None: dense, transformers' own attention)."""
    table = getattr(getattr(module, "config", None), CONFIG_KEY, None) or {}
    layer = getattr(module, "layer_idx", None)
    site = table.get(str(layer))
    if _SEEN[0] is not None and layer is not None:
        _SEEN[0].add(layer)
    if site is None:
        return None
    if site.get("pattern") not in ATTENTION_PATTERNS or (site["pattern"] != "dense" and not (
            isinstance(site.get("stride"), int) and site["stride"] >= 1)):
        raise MstCompileError(f"config.json {CONFIG_KEY}[{str(layer)!r}] = {site} is invalid: expected "
                              f"{{'pattern': one of {', '.join(ATTENTION_PATTERNS)}, 'stride': an integer >= 1}}")
    return site


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D)."""
    site = _site(module)
    if site is None or site["pattern"] == "dense":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # attention dropout applies to dense attention only, as in training (ops/attention.py)
    out = hsa_attention_cached(query, key, value, pattern=site["pattern"], stride=site["stride"], attn_mask=attention_mask,
                               scale=scaling)  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def mask_for(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0, **kwargs):
    """The mask transformers builds for ``mst_hsa``: SDPA's, once the queries are known to end the keys."""
    if int(kv_offset) + kv_length != int(q_offset) + q_length:
        raise MstCompileError(
            f"the {NAME} attention needs the new tokens at the end of the cached keys (no cache, or the default "
            f"dynamic cache); this cache holds {kv_length} key slots for queries at {int(q_offset)}..{int(q_offset) + q_length - 1} "
            "(a static cache): generate without cache_implementation='static'")
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     **kwargs)


def register() -> None:
    """Make ``attn_implementation="mst_hsa"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_for)


def config_entries(model: nn.Module, chosen: dict[str, tuple[str, int | None]]) -> dict[str, dict]:
    """``mst_attention`` for config.json: each attention site (a module path of ``model``) by its layer_idx."""
    out: dict[str, dict] = {}
    for site, (pattern, stride) in chosen.items():
        try:
            layer = getattr(model.get_submodule(site), "layer_idx", None)
        except AttributeError:
            layer = None
        if not isinstance(layer, int):
            raise MstCompileError(
                f"export_hf: attention site {site!r} is not an attention layer of {type(model).__name__} with a layer_idx, "
                "so config.json cannot select its pattern; export ONNX (mstc export RUN) or load the run with mst_compile.load")
        entry = {"pattern": pattern, "stride": stride}
        if out.setdefault(str(layer), entry) != entry:
            raise MstCompileError(f"export_hf: layer {layer} holds two attention sites with different patterns "
                                  f"({out[str(layer)]} and {entry}); config.json can select one per layer")
    return out


@contextlib.contextmanager
def recording():
    """Yields the set of layer_idx of the layers that run ``mst_hsa`` within this context."""
    seen: set[int] = set()
    _SEEN[0] = seen
    try:
        yield seen
    finally:
        _SEEN[0] = None
