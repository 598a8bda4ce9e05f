"""FLOP ledger (docs/design.md §6): algorithmic training FLOPs of the MST run and of the same model dense.

The count is the method's algorithmic cost, not a measurement: a sparse linear is charged for its
active weights even where it runs as a dense matmul on a masked (zero-filled) weight, so the
saving it reports is what a kernel that skips the zeros would get. Wall time is measured beside
it (``mstc train``'s summary, ``mstc report``). Counted at every training forward (grad enabled)
from the real operands, over the whole model:

- sparse linear with density d, per row (token) it sees:
      forward 2·d·n_in·n_out, backward 4·d·n_in·n_out,
      plus 2·(1 − d)·n_in·n_out when the call also forms the dense gradient (the step before an
      update that grows this weight by gradient)
- attention per site, per query token (q of shape (B, n_heads, T, d_head)):
      4·a·d_head·n_heads forward, ×3 with backward, where a is the mean number of keys attended under
      the pattern that runs ((T + 1)/2 for dense causal, which is also what a sparse site runs when
      a padding mask sends it to masked dense SDPA)
- every matmul and attention op the passes left dense (``DenseOp``: skipped weights, activation
  matmuls of attention that was not rewritten): its forward FLOPs ×3, on BOTH sides

The dense baseline uses d = 1, no dense-gradient extra and dense causal attention. Causal attention
is charged (T + 1)/2 keys per query on both sides; ``torch.utils.flop_counter.FlopCounterMode``
charges the full T² of causal SDPA, so its attention term is (T + 1)/(2T) times ours. Non-matmul work
(embedding lookups, norms, activations, the loss, the optimizer) is left out of both and listed in
``excluded``. Work counted between two optimizer steps is charged to the second. The count is
algorithmic: the masked-dense kernels run dense matmuls on zeros, so wall time is measured apart.

The hooks run inside ``torch.compile``'d forwards, so the linear hooks only record shapes (the rows
each sparse weight saw); densities and probe steps are applied when the step is charged, outside the
compiled region. A hook that read a density would make the compiled graph guard on its value and
recompile at every topology update.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..constants import UNCOUNTED
from ..ops.attention import mean_attended_keys
from ..ops.dense_op import DenseOp

_OTHER_OPS = "embedding lookups, norms, activations, residual adds, the loss and the optimizer update"


@dataclass
class FlopReport:
    """Cumulative algorithmic MST and dense FLOPs of the steps taken so far (``sm.mst.flops``)."""

    mst_total: float = 0.0
    dense_total: float = 0.0
    tokens: int = 0  # tokens of every training forward so far (B·T of the inputs)
    steps: int = 0
    last_step_mst: float = 0.0
    last_step_dense: float = 0.0
    last_step_tokens: int = 0
    linear_mst: float = 0.0  # the linear part of mst_total
    attention_mst: float = 0.0  # the attention part of mst_total
    excluded: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """dense_total / mst_total (1.0 before any work is counted)."""
        return self.dense_total / self.mst_total if self.mst_total else 1.0

    @property
    def last_step_reduction(self) -> float:
        return self.last_step_dense / self.last_step_mst if self.last_step_mst else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mst_total": self.mst_total,
            "dense_total": self.dense_total,
            "reduction": self.reduction,
            "tokens": self.tokens,
            "steps": self.steps,
            "last_step_mst": self.last_step_mst,
            "last_step_dense": self.last_step_dense,
            "last_step_tokens": self.last_step_tokens,
            "last_step_reduction": self.last_step_reduction,
            "linear_mst": self.linear_mst,
            "attention_mst": self.attention_mst,
            "excluded": list(self.excluded),
        }


def linear_flops(rows: float, work: int, density: float, probe: bool) -> float:
    """Training FLOPs of a sparse linear over ``rows`` input rows: 6·d·work, plus 2·(1 − d)·work per
    row on a probe step (the dense gradient), with work = n_in·n_out."""
    return rows * work * (6.0 * density + (2.0 * (1.0 - density) if probe else 0.0))


def attention_flops(per_key: float, T: int, pattern: str, stride: int | None) -> float:
    """Training FLOPs of an attention call: ``per_key`` (12·d_head·heads·queries) times the mean keys
    a query attends under ``pattern`` ((T + 1)/2 for dense causal)."""
    return per_key * ((T + 1) / 2 if pattern == "dense" else mean_attended_keys(pattern, T, stride))


@dataclass(frozen=True)
class Footprint:
    """What one training forward shows the ledger before densities, probes and patterns apply: the
    closed form that ``mst_compile.plan`` integrates over a schedule (``runtime/forecast.py``)."""

    tokens: int  # B·T of the forward
    linear: dict[str, tuple[int, int]]  # sparse weight -> (rows it saw, n_in·n_out)
    attention: list[tuple[str, float, int, bool]]  # per call: (site, per_key, T, runs masked dense)
    dense_ops: float  # training FLOPs of what stayed dense (charged alike on both sides)

    def step_flops(self, density, probes, patterns, scale: float = 1.0) -> tuple[float, float, float, float]:
        """(mst, dense, linear mst, attention mst) of a step of ``scale`` such forwards, with
        ``density[name]``, the probed weights ``probes`` and ``patterns[(site, T)] = (pattern, stride)``."""
        lin = sum(linear_flops(rows, work, density[n], n in probes) for n, (rows, work) in self.linear.items())
        lin_dense = sum(linear_flops(rows, work, 1.0, False) for rows, work in self.linear.values())
        att = att_dense = 0.0
        for site, per_key, T, masked in self.attention:
            pattern, stride = ("dense", T) if masked else patterns[(site, T)]
            att += attention_flops(per_key, T, pattern, stride)
            att_dense += attention_flops(per_key, T, "dense", None)
        mst = lin + att + self.dense_ops
        dense = lin_dense + att_dense + self.dense_ops
        return mst * scale, dense * scale, lin * scale, att * scale


@dataclass(frozen=True)
class Pending:
    """What the hooks counted since the last optimizer step, charged by the next ``close_step``."""

    mst: float = 0.0
    dense: float = 0.0
    tokens: int = 0
    linear: float = 0.0  # the linear part of mst
    attention: float = 0.0  # the attention part of mst


def count_tokens(args: tuple, kwargs: dict) -> int:
    """B·T of a model call: the first integer tensor input (token ids), else the leading dims of the first tensor."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    for t in tensors:
        if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool and t.dim() >= 1:
            return t.numel()
    for t in tensors:
        if t.dim() >= 2:
            return t.numel() // t.shape[-1]
        if t.dim() == 1:
            return t.numel()
    return 0


class FlopLedger:
    """Accumulates FLOPs from forward pre-hooks and charges them at every optimizer step."""

    def __init__(self, linear: dict[str, tuple[int, Any]], attention: dict[str, nn.Module],
                 density: Callable[[str], float], excluded: list[str]):
        self._linear = linear  # name -> (n_in·n_out, SparseWeight)
        self._attention = attention
        self._density = density
        self.report = FlopReport(excluded=list(excluded))
        self._pending = Pending()
        self._rows = dict.fromkeys(linear, 0)  # rows (tokens) each sparse weight saw since the last step
        self._hooks: list = []
        self._record: dict | None = None  # set by footprint(): what the hooks saw, raw

    # -- hooks --------------------------------------------------------------------------------
    def install(self, root: nn.Module) -> None:
        self._hooks.append(root.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for name, (work, sw) in self._linear.items():
            self._hooks.append(sw.register_forward_pre_hook(self._linear_hook(name, work, sw)))
        for site in self._attention.values():
            self._hooks.append(site.register_forward_pre_hook(self._attention_hook(site), with_kwargs=True))
        for op in root.modules():
            if isinstance(op, DenseOp):
                self._hooks.append(op.register_forward_hook(self._dense_hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _on_model(self, module, args, kwargs):
        if torch.is_grad_enabled():
            self._pending = replace(self._pending, tokens=self._pending.tokens + count_tokens(args, kwargs))

    def _linear_hook(self, name: str, work: int, sw):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return
            x = args[0]
            self._rows[name] += x.numel() // x.shape[-1] if x.dim() else 1
        return hook

    def _charge_linear(self) -> None:
        """Turn the rows each sparse weight saw into FLOPs at the densities of this step."""
        for name, rows in self._rows.items():
            if rows:
                work, sw = self._linear[name]
                mst = linear_flops(rows, work, self._density(name), sw.probing)  # probe: the dense gradient
                self._add(mst, linear_flops(rows, work, 1.0, False), linear=mst)
                self._rows[name] = 0

    def _attention_hook(self, site: nn.Module):
        def hook(module, args, kwargs=None):
            if not torch.is_grad_enabled():
                return
            q = args[0]
            T, D = q.shape[-2], q.shape[-1]
            heads_x_batch = q.numel() // (T * D)  # B·n_heads (or B·n_heads flattened, for 3-D q)
            per_key = 12.0 * D * heads_x_batch * T  # 4·d_head·n_heads per token forward, ×3 with backward
            mask = args[3] if len(args) > 3 else (kwargs or {}).get("attn_mask")
            pattern, stride = site.effective(T)
            masked = site.runs_masked_dense(T, mask)
            if self._record is not None:
                self._record["attention"].append((site.site, per_key, T, masked))
            mst = attention_flops(per_key, T, "dense" if masked else pattern, stride)  # what runs
            self._add(mst, attention_flops(per_key, T, "dense", None), attention=mst)
        return hook

    def _dense_hook(self, module, args, kwargs, out):
        if torch.is_grad_enabled():
            work = 3.0 * module.forward_flops(args, kwargs, out)  # forward + a backward of twice the work
            if self._record is not None:
                self._record["dense_ops"] += work
            self._add(work, work)

    def _add(self, mst: float, dense: float, linear: float = 0.0, attention: float = 0.0) -> None:
        p = self._pending
        self._pending = replace(p, mst=p.mst + mst, dense=p.dense + dense, linear=p.linear + linear,
                                attention=p.attention + attention)

    @contextlib.contextmanager
    def _isolated(self, root: nn.Module):
        """Hooks installed and fresh counters for one forward, then everything as it was."""
        installed = bool(self._hooks)
        if not installed:
            self.install(root)
        saved, self._pending = self._pending, Pending()
        saved_rows, self._rows = self._rows, dict.fromkeys(self._rows, 0)
        try:
            with torch.enable_grad():
                yield
        finally:
            self._pending, self._rows = saved, saved_rows
            if not installed:
                self.remove()

    def measure(self, root: nn.Module, call: Callable[[], Any]) -> tuple[float, float, int]:
        """(MST, dense, tokens) one training forward ``call()`` would be charged, without charging it."""
        with self._isolated(root):
            call()
            self._charge_linear()
            return self._pending.mst, self._pending.dense, int(self._pending.tokens)

    def footprint(self, root: nn.Module, call: Callable[[], Any]) -> Footprint:
        """The raw observations of one training forward ``call()`` (nothing is charged)."""
        self._record = {"attention": [], "dense_ops": 0.0}
        try:
            with self._isolated(root):
                call()
                rows, tokens, record = dict(self._rows), int(self._pending.tokens), self._record
        finally:
            self._record = None
        linear = {n: (r, self._linear[n][0]) for n, r in rows.items() if r}
        return Footprint(tokens, linear, record["attention"], record["dense_ops"])

    # -- charging -----------------------------------------------------------------------------
    def close_step(self) -> None:
        """Charge everything counted since the previous optimizer step to this one."""
        self._charge_linear()
        p, r = self._pending, self.report
        r.steps += 1
        r.last_step_mst, r.last_step_dense, r.last_step_tokens = p.mst, p.dense, int(p.tokens)
        r.mst_total += p.mst
        r.dense_total += p.dense
        r.tokens += int(p.tokens)
        r.linear_mst += p.linear
        r.attention_mst += p.attention
        self._pending = Pending()

    def state_dict(self) -> dict[str, Any]:
        r = self.report
        return {k: getattr(r, k) for k in ("mst_total", "dense_total", "tokens", "steps", "last_step_mst",
                                           "last_step_dense", "last_step_tokens", "linear_mst", "attention_mst")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if hasattr(self.report, k) and k != "excluded":
                setattr(self.report, k, v)
        self._pending = Pending()
        self._rows = dict.fromkeys(self._rows, 0)


def excluded_ops(skipped: list[tuple[str, str]]) -> list[str]:
    """What the ledger leaves out of both counts, in words (skipped matmuls are charged dense)."""
    out = [f"ops that are not matmuls: {_OTHER_OPS}"]
    out.extend(f"{name}: {why}" for name, why in skipped if UNCOUNTED in why)
    return out
