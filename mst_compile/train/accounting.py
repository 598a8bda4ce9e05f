"""What the loop trains and how it counts: the sparsified module (MST) or the plain captured one (dense).

Both modes report the same numbers (phase, density, attention patterns, cumulative FLOPs), so an
MST run and its dense baseline land in comparable metrics. MST's FLOPs come from the runtime's
ledger; the dense run counts with the same per-token formula at density 1 and dense causal
attention, so "dense FLOPs" means the same thing in both runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings

import torch

from ..errors import CheckpointError


@contextlib.contextmanager
def quiet_torch():
    """Keep torch's own output out of the terminal while capturing: a failed ``torch.export`` prints
    its partial graph to stderr and logs warnings, but the failure is reported as one CaptureError
    line. Warnings raised outside torch (a model's dropout under export, say) are shown afterwards."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    torch_dir = os.path.dirname(torch.__file__)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("default")
            yield
    finally:
        logger.setLevel(level)
        for w in caught:
            if not str(w.filename).startswith(torch_dir):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class Accounting:
    def __init__(self, model, mst_config, tc, example_inputs, batch, d):
        self.dense, self.world, self.tokens = tc.dense, d.world, 0
        self._dense_total = 0.0
        self._seen_update = None
        with quiet_torch():
            if tc.dense:
                from ..capture import capture

                self.sm = None
                self.module, _ = capture(model, example_inputs)
                self._per_token = dense_flops_per_token(model, mst_config, example_inputs, batch)
            else:
                from ..api import sparsify

                self.sm = sparsify(model, mst_config, example_inputs=example_inputs)
                self.module = self.sm
        self.module.to(d.device)

    @property
    def mst(self):
        return self.sm.mst if self.sm is not None else None

    def attach(self, optimizer) -> None:
        if self.mst is not None:
            self.mst.attach(optimizer)

    def after_step(self, tokens: int) -> None:
        self.tokens += tokens
        if self.dense:
            self._dense_total += self._per_token * tokens

    # -- what the run is doing --------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self.mst.phase if self.mst is not None else "dense"

    @property
    def target_sparsity(self) -> float:
        return float(self.mst.target_sparsity) if self.mst is not None else 0.0

    def density(self) -> float:
        return float(self.mst.density()) if self.mst is not None else 1.0

    def densities(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.mst.densities().items()} if self.mst is not None else {}

    def patterns(self) -> dict[str, str]:
        return dict(self.mst.attention_patterns()) if self.mst is not None else {}

    def flops(self) -> dict[str, float]:
        """Cumulative training FLOPs of all processes (each ledger counts its own tokens)."""
        if self.mst is None:
            return {"mst_flops": self._dense_total, "dense_flops": self._dense_total}
        f = self.mst.flops
        return {"mst_flops": float(f.mst_total) * self.world, "dense_flops": float(f.dense_total) * self.world}

    def reduction(self) -> float:
        f = self.flops()
        return f["dense_flops"] / f["mst_flops"] if f["mst_flops"] else 1.0

    def excluded(self) -> list:
        if self.mst is None:
            return []
        return list(getattr(self.mst.flops, "excluded", []) or [])

    def new_updates(self) -> list[dict]:
        """Topology updates since the last call, as metrics records."""
        if self.mst is None:
            return []
        u = self.mst.last_update
        if u is None or u is self._seen_update:
            return []
        self._seen_update = u
        rec = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v) for k, v in dict(u).items()}
        rec.setdefault("step", int(self.mst.step_count))
        return [rec]

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dense": self.dense, "tokens": self.tokens, "dense_total": self._dense_total,
                "mst": self.mst.state_dict() if self.mst is not None else None}

    def load_state_dict(self, sd: dict, where) -> None:
        if sd.get("dense") != self.dense:
            kind = "a dense baseline" if sd.get("dense") else "an MST run"
            raise CheckpointError(f"checkpoint {where} belongs to {kind}; this run is {'dense' if self.dense else 'MST'}")
        self.tokens, self._dense_total = int(sd["tokens"]), float(sd["dense_total"])
        if self.mst is not None:
            self.mst.load_state_dict(sd["mst"])
            self._seen_update = self.mst.last_update  # already logged before the interruption


def dense_flops_per_token(model, mst_config, example_inputs, batch: torch.Tensor) -> float:
    """Training FLOPs per token of the dense model, by the ledger's formula (docs/design.md §6).

    The sites are found by the same passes MST uses (on a throwaway capture sharing the model's
    parameters), and the ledger measures one forward on a real (B, T) batch: the dense side of what
    an MST step on that batch would be charged, so both runs count the same ops.
    """
    from ..api import sparsify

    sm = sparsify(model, mst_config, example_inputs=example_inputs)
    _, dense, tokens = sm.mst.measure_flops(batch)
    return dense / tokens


def ranks_identical(acct: Accounting, model, d) -> dict[str, bool]:
    """Compare masks and weights across processes by hash (DDP must keep both bit-identical)."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    masks = digest(acct.mst.masks().values()) if acct.mst is not None else ""
    weights = digest(p for _, p in sorted(model.state_dict().items()))
    got = d.gather((masks, weights))
    return {"masks": len({g[0] for g in got}) == 1, "weights": len({g[1] for g in got}) == 1}
