"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model's own ``state_dict`` (loadable into ``model()`` without mst_compile),
the optimizer, the MST state (masks, schedule position, its random generator), the data position
and the RNG states. It is written to a temporary file in the same folder and renamed over the old
one, so a crash mid-write leaves the previous checkpoint intact. ``last.pt`` follows the run;
``best.pt`` is the lowest validation loss so far.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

FORMAT = 1


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(model: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter and buffer names with shapes: what a checkpoint must match to be loaded."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def make_checkpoint(*, step: int, model, optimizer, mst_state, extra: dict) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "model_class": type(model).__name__,
        "fingerprint": fingerprint(model),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "mst": mst_state,
        "rng": rng_state(),
        **extra,
    }


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run folder has no checkpoints/last.pt to resume from")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is one line
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mst_compile training checkpoint (format {FORMAT})")
    return ck


def check_same_model(ck: dict, model, path: Path) -> None:
    """Refuse a checkpoint written by a different model, naming the first differences."""
    have, want = fingerprint(model), ck["fingerprint"]
    if have == want:
        return
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = [f"{k} {want[k]} vs {have[k]}" for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    parts = [f"missing from the model: {missing[:3]}" if missing else "", f"not in the checkpoint: {extra[:3]}" if extra else "",
             f"shapes differ: {shapes[:3]}" if shapes else ""]
    raise CheckpointError(
        f"checkpoint {path} was written by a different model ({ck.get('model_class')}, this one is "
        f"{type(model).__name__}): " + "; ".join(p for p in parts if p)
    )
