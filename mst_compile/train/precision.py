"""Mixed precision for ``mstc train --precision``: autocast around the forward, fp32 master weights.

- ``fp32``: nothing changes.
- ``bf16``: ``torch.autocast`` with bfloat16 (CUDA, and CPU autocast on CPU). The parameters, their
  gradients and the optimizer state stay fp32; the sparse linear op casts like ``F.linear`` does.
- ``fp16``: autocast with float16 and a ``GradScaler``. A step whose gradients overflow is skipped by
  the scaler: the optimizer does not step, so neither the MST step counter nor its schedule moves
  (the runtime counts optimizer steps), and the loop redoes the same step at the lower loss scale.

Masked weights stay exactly zero in every mode: the runtime re-applies the masks to the fp32
weights after each optimizer step.
"""
from __future__ import annotations

import contextlib

import torch

from .options import PRECISIONS

MAX_SKIPS = 30  # consecutive skipped fp16 steps before the run is called diverged (scale / 2^30)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, precision: str, device: torch.device):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid: expected one of {', '.join(PRECISIONS)}")
        self.name, self.device_type = precision, torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.skipped = 0  # optimizer steps the scaler skipped so far

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer) -> None:
        """Bring the gradients back to their true size (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Step the optimizer; False when the grad scaler skipped the step (inf/NaN gradients)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale  # the scaler backs its scale off exactly when it skips
        self.skipped += not stepped
        return stepped

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.skipped = int(state.get("skipped", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
