"""Hybrid sparse attention (HSA, docs/design.md §5): one switchable module per causal attention site.

Patterns, for query i, key j <= i and stride l:

- ``dense``:   every j <= i (plain causal SDPA)
- ``local``:   i - j < l
- ``strided``: (i - j) mod l == 0
- ``sparse``:  local ∪ strided in one head (the default of MST's ultra-sparse phase)

``hsa_attention`` skips the masked work in forward and backward (see ``attention_kernels``);
``hsa_attention_cached`` runs a pattern for queries at the end of a longer key sequence (a KV cache);
``pattern_mask`` is the dense boolean oracle, for tests only; ``mean_attended_keys`` is the exact
mean number of keys per query, which the FLOP ledger multiplies into the attention cost.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import ATTENTION_PATTERNS as PATTERNS
from ..constants import blocks, default_stride
from .attention_kernels import hsa_kernel

_KEEP = object()  # set_pattern(stride=...) default: keep the current stride


def in_order(t: Tensor, order: tuple[int, ...]) -> Tensor:
    """``t`` laid out in memory with its dims in ``order`` (outermost first); copied only if it is not."""
    if all(t.stride(a) >= t.stride(b) * t.shape[b] for a, b in zip(order, order[1:]) if t.shape[a] > 1 and t.shape[b] > 1):
        return t
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return t.permute(order).contiguous().permute(inverse)


def check_pattern(pattern, who: str) -> str:
    """``pattern`` if it names an attention pattern; else one line naming ``who`` and the patterns."""
    if pattern not in PATTERNS:
        raise ValueError(f"{who}: unknown attention pattern {pattern!r}; expected one of {', '.join(PATTERNS)}")
    return pattern


def check_stride(stride, who: str) -> int | None:
    """``stride`` must be None (T/8 at run time) or an int >= 1.

    A stride past the sequence length is well defined: every key j <= i lies within l of query i,
    so ``local`` and ``sparse`` are dense causal and ``strided`` keeps only j == i."""
    if stride is None:
        return None
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{who}: stride={stride!r} is invalid; expected an integer >= 1 or None (T/8)")
    return stride


def allowed_positions(q_pos: Tensor, k_pos: Tensor, pattern: str, stride: int) -> Tensor:
    """Boolean (Tq, Tk): True where the query at position ``q_pos[a]`` may attend the key at ``k_pos[b]``
    (causal, and within ``pattern`` of stride ``stride``). The one definition of the patterns as masks."""
    d = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk) distance i - j
    causal = d >= 0
    if pattern == "dense":
        return causal
    local, strided = d < stride, d % stride == 0
    return causal & {"local": local, "strided": strided, "sparse": local | strided}[pattern]


def pattern_mask(T: int, stride: int | None, pattern: str, device=None) -> Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: the reference oracle of the tests, and
    the mask of a training site's padding fallback. Built once per (T, stride, pattern, device); read only."""
    check_pattern(pattern, "pattern_mask")
    l = check_stride(stride, "pattern_mask") or default_stride(T)
    return _pattern_mask(T, l, pattern, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _pattern_mask(T: int, l: int, pattern: str, device: torch.device) -> Tensor:
    pos = torch.arange(T, device=device)
    return allowed_positions(pos, pos, pattern, l)


def mean_attended_keys(pattern: str, T: int, stride: int | None) -> float:
    """Exact mean over the T queries of the number of keys each attends ((T+1)/2 for dense).

    Per query i (0-based): local min(i+1, l); strided ⌊i/l⌋ + 1; sparse min(i+1, l) + ⌊i/l⌋
    (the strided keys other than j = i all lie at distance >= l, outside the band).
    """
    check_pattern(pattern, "mean_attended_keys")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"mean_attended_keys: T={T!r} is invalid; expected an integer >= 1")
    l = check_stride(stride, "mean_attended_keys") or default_stride(T)
    if pattern == "dense":
        return (T + 1) / 2
    ll = min(l, T)
    band = ll * (ll + 1) // 2 + (T - ll) * ll  # Σ min(i+1, l)
    q, r = divmod(T, l)
    floors = l * q * (q - 1) // 2 + r * q  # Σ ⌊i/l⌋
    total = {"local": band, "strided": floors + T, "sparse": band + floors}[pattern]
    return total / T


def effective_pattern(pattern: str, stride: int | None, stride_scale: float, T: int) -> tuple[str, int]:
    """(pattern, stride) that a site set to ``pattern``/``stride`` (None: T/8), widened by
    ``stride_scale``, runs at length ``T``; a local band that covers every earlier key is dense."""
    l = stride or default_stride(T)
    if stride_scale != 1.0:
        l = math.ceil(l * stride_scale)
    if pattern == "dense" or (pattern in ("local", "sparse") and l >= T):
        return "dense", T
    return pattern, min(l, T)


def hsa_attention(q: Tensor, k: Tensor, v: Tensor, *, pattern: str, stride: int | None, scale: float | None = None) -> Tensor:
    """Causal attention restricted to ``pattern`` with stride ``stride`` (None: T/8).

    q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 (grouped-query attention). ``dense`` is
    plain causal SDPA; the sparse patterns never form a T×T matrix, forward or backward.
    """
    check_pattern(pattern, "hsa_attention")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"hsa_attention: expected 4-D q, k, v of shape (B, H, T, D), got {shapes}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(
            f"hsa_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit: expected "
            "k and v of shape (B, Hkv, T, D) with the query's heads a multiple of Hkv (causal self-attention)"
        )
    return _hsa(q, k, v, pattern, min(check_stride(stride, "hsa_attention") or default_stride(T), T), scale)


def _hsa(q: Tensor, k: Tensor, v: Tensor, pattern: str, l: int, scale: float | None) -> Tensor:
    """``hsa_attention`` on checked arguments, ``l <= T`` (l > T selects what l = T does): what a site's forward calls."""
    T = q.shape[-2]
    if pattern == "dense" or (pattern != "strided" and l == T):  # a band as wide as T is causal attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return hsa_kernel(q, k, v, local=pattern != "strided", strided=pattern != "local", stride=l, scale=scale)


def allowed_keys(mask: Tensor) -> Tensor:
    """Boolean view of an SDPA mask, True where a key may be attended: a bool mask as it is; an
    additive float mask allows the entries that do not block (``constants.blocks``: above -1e4)."""
    if mask.dtype == torch.bool:
        return mask
    return ~blocks(mask)


def removes_causal_keys(attn_mask: Tensor, T: int) -> bool:
    """True when the (…, T, T) ``attn_mask`` blocks a key that causality keeps (padding in the batch)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=attn_mask.device).tril()
    return not bool((allowed_keys(attn_mask) | ~causal).all())


def hsa_attention_cached(q: Tensor, k: Tensor, v: Tensor, *, pattern: str, stride: int, attn_mask: Tensor | None = None,
                         scale: float | None = None) -> Tensor:
    """``pattern`` with a fixed ``stride`` for queries that are the last Tq of the Tk keys: a whole
    sequence (Tq == Tk), or the new tokens of a KV cache, at their absolute positions Tk-Tq, ..., Tk-1.

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) with Hq % Hkv == 0; ``attn_mask`` (bool, or additive,
    broadcastable to (B, Hq, Tq, Tk)) applies on top (padding). A whole sequence whose mask blocks no
    causal key runs ``hsa_attention`` (the skipping kernels); anything else is masked dense SDPA over
    the pattern (exact; a decoding step reads Tk keys for its one query). ``pattern`` and ``stride`` are
    taken as checked: this runs on every generation step (``integrations/hf_attention`` checks config.json).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq > Tk:
        raise ValueError(f"hsa_attention_cached: {Tq} queries but only {Tk} keys; the queries must be the last of the keys")
    if Tq == Tk and (attn_mask is None or not removes_causal_keys(attn_mask, Tk)):
        return _hsa(q, k, v, pattern, min(stride or default_stride(Tk), Tk), scale)
    pos = torch.arange(Tk, device=q.device)
    keep = allowed_positions(pos[Tk - Tq:], pos, pattern, stride)  # (Tq, Tk)
    if attn_mask is not None:
        keep = allowed_keys(attn_mask) & keep
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class HybridSparseAttention(nn.Module):
    """One attention site. ``pattern``/``stride`` switch at run time without re-capturing.

    ``forward(q, k, v, attn_mask=None, scale=None, enable_gqa=False)`` receives what the site
    computed before the rewrite. The site is causal; ``attn_mask`` is only given when the site's mask
    depends on the model's inputs (a padding mask on top of causality); the pass drops masks that are
    a function of the shapes alone.

    A runtime ``attn_mask`` with a sparse pattern: when the mask removes nothing that causality keeps
    (no padding in this batch) the fast kernel runs; otherwise the pattern AND the mask are both
    applied through masked dense SDPA (exact, but without the saving) and a warning says so once;
    the FLOP ledger charges such a call as dense causal attention (``runs_masked_dense``).
    Attention dropout (``dropout_p``) applies to ``dense`` only; sparse patterns run without it.
    """

    def __init__(self, site: str, pattern: str = "dense", stride: int | None = None, dropout_p: float = 0.0):
        super().__init__()
        self.site = site
        self.dropout_p = float(dropout_p)
        self.pattern = "dense"
        self.stride: int | None = None
        self.stride_scale = 1.0  # >1 widens the window and stride (a gradual return to dense attention)
        self._warned: set[str] = set()
        # the captured op's memory order of its output dims, outermost first (torch.export: the graph may have
        # dropped a .contiguous() that this order made a no-op, so later views rely on it); None: any order
        self.layout: tuple[int, ...] | None = None
        self.set_pattern(pattern, stride=stride)

    def set_pattern(self, pattern: str, stride=_KEEP) -> None:
        """Switch this site's pattern (and stride; default: keep it; None: T/8 at run time)."""
        who = f"attention site '{self.site}'"
        self.pattern = check_pattern(pattern, who)
        if stride is not _KEEP:
            self.stride = check_stride(stride, who)

    def effective(self, T: int) -> tuple[str, int]:
        """(pattern, stride) that a forward of length ``T`` runs: the stride scaled by ``stride_scale``;
        a local band that covers every earlier key is dense causal attention."""
        return effective_pattern(self.pattern, self.stride, self.stride_scale, T)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, pattern={self.pattern!r}, stride={self.stride if self.stride is not None else 'T/8'}"

    def runs_masked_dense(self, T: int, attn_mask: Tensor | None) -> bool:
        """True when a call with this ``attn_mask`` falls back to masked dense SDPA: the pattern is
        sparse and the mask removes keys that causality keeps (padding in this batch)."""
        return self.pattern != "dense" and attn_mask is not None and removes_causal_keys(attn_mask, T)

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"attention site '{self.site}': {msg}", stacklevel=3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale=None,
                enable_gqa: bool = False) -> Tensor:
        out = self._attend(q, k, v, attn_mask, scale, enable_gqa)
        return out if self.layout is None else in_order(out, self.layout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale, enable_gqa: bool) -> Tensor:
        squeeze = q.dim() == 3  # (B·H, T, D) from a bmm-style spelling
        if squeeze:
            q, k, v = q[None], k[None], v[None]
        scale = None if scale is None else float(scale)
        T = q.shape[-2]
        gqa = enable_gqa or k.shape[-3] != q.shape[-3]
        pattern, l = self.effective(T)
        if pattern == "dense":
            p = self.dropout_p if self.training else 0.0
            if attn_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=scale, enable_gqa=gqa)
            return out[0] if squeeze else out
        if self.training and self.dropout_p > 0:
            self._warn_once("dropout", f"attention dropout p={self.dropout_p} is not applied by the '{self.pattern}' pattern")
        if self.runs_masked_dense(T, attn_mask):
            self._warn_once("mask", "the attention mask removes causal keys (padding), so the "
                            f"'{self.pattern}' pattern runs as masked dense attention for such batches")
            keep = _pattern_mask(T, l, pattern, q.device)
            mask = attn_mask & keep if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, -math.inf)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
            return out[0] if squeeze else out
        out = _hsa(q, k, v, pattern, l, scale)  # pattern and stride were checked when set
        return out[0] if squeeze else out
