"""Checkpoints: everything needed to continue a run exactly, written atomically and checksummed.

A checkpoint holds the model's own ``state_dict`` (loadable into ``model()`` without mst_compile),
the optimizer, the MST state (masks, schedule position, its random generator), the data position
and the RNG states. It is written to a temporary file in the same folder and renamed into place, so
a crash mid-write leaves the previous checkpoints intact (``clean_temp`` removes the leftover).

Folder layout: ``step-NNNNNNN.pt`` for the newest ``keep`` checkpoints, ``last.pt`` the newest of
them (a hard link, else a copy), ``best.pt`` the lowest validation loss so far, and ``sha256sums``:
one ``<sha256>  <step>  <file>`` line per file written. A file verifies when its digest is listed.
The digest is recorded BEFORE the rename, so a crash between the two never makes a good file look
corrupt; a flipped byte anywhere makes the digest unknown. Run folders written before checksums
existed (no ``sha256sums``) are read as they are.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .run_folder import BEST, CHECKPOINTS, LAST

FORMAT = 1
SUMS = "sha256sums"
_STEP_FILE = re.compile(r"step-(\d+)\.pt")


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _saved_temp(obj: Any, path: Path) -> str:
    """``torch.save`` to a fsynced temp file beside ``path``; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over it."""
    os.replace(_saved_temp(obj, path), path)


def sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sums(folder: Path) -> list[tuple[str, int, str]] | None:
    """The ``sha256sums`` lines as (digest, step, file); None when the folder has none."""
    p = folder / SUMS
    if not p.is_file():
        return None
    out = []
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            out.append((parts[0], int(parts[1]), parts[2]))
    return out


def _record(folder: Path, digest: str, step: int, name: str) -> None:
    """Add a line; drop those of files that are gone (the two newest per name stay, see the docstring)."""
    rows = [r for r in _sums(folder) or [] if (folder / r[2]).exists()] + [(digest, step, name)]
    kept = [r for i, r in enumerate(rows) if sum(1 for q in rows[i + 1:] if q[2] == r[2]) < 2]
    write_text_atomic(folder / SUMS, "".join(f"{d}  {s}  {n}\n" for d, s, n in kept))


def save_checkpoint(state: dict, folder: Path, *, keep: int, best: bool = False) -> Path:
    """Write ``state`` as ``step-N.pt`` (and ``last.pt``), or as ``best.pt``; keep the newest ``keep`` step files."""
    step = int(state["step"])
    target = folder / (BEST if best else f"step-{step:07d}.pt")
    tmp = _saved_temp(state, target)
    try:
        _record(folder, sha256(tmp), step, target.name)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if best:
        return target
    alias = _temp_beside(folder / LAST)
    os.unlink(alias)
    try:
        os.link(target, alias)
    except OSError:  # no hard links on this file system
        shutil.copyfile(target, alias)
    os.replace(alias, folder / LAST)
    for old in step_files(folder)[keep:]:
        old.unlink()
    return target


def step_files(folder: Path) -> list[Path]:
    """``step-N.pt`` files, newest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verifies(path: Path) -> bool:
    """True when ``path``'s digest is recorded in its folder's ``sha256sums`` (or the folder predates them)."""
    sums = _sums(path.parent)
    return sums is None or (path.is_file() and sha256(path) in {d for d, _, _ in sums})


def last_good(folder: Path, skip: Path | None = None) -> Path | None:
    """The newest checkpoint of ``folder`` that verifies (``last.pt`` first), other than ``skip``."""
    for p in [folder / LAST, *step_files(folder)]:
        if p.is_file() and (skip is None or not p.samefile(skip)) and verifies(p):
            return p
    return None


def clean_temp(folder: Path) -> list[Path]:
    """Remove the temp files of interrupted writes (``.NAME.*.tmp``) in ``folder`` and its checkpoints."""
    gone = [p for d in (folder, folder / CHECKPOINTS) if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    for p in gone:
        p.unlink()
    return gone


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


def make_checkpoint(*, step: int, model, optimizer, mst_state, extra: dict, whole: tuple[dict, dict] | None = None) -> dict:
    """The checkpoint of ``model`` and ``optimizer`` as they are, or of ``whole``: their (model, optimizer) state
    dicts gathered whole from FSDP2's shards (``train/sharded.py``), which the file then holds in the same format."""
    model_state, optim_state = whole if whole is not None else (model.state_dict(), optimizer.state_dict())
    return {
        "format": FORMAT,
        "step": step,
        "model_class": type(model).__name__,
        "fingerprint": {k: list(v.shape) for k, v in model_state.items()},
        "model": model_state,
        "optimizer": optim_state,
        "mst": mst_state,
        "rng": rng_state(),
        **extra,
    }


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint after checking its sha256; a mismatch names the previous one that verifies."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run folder has no {CHECKPOINTS}/{LAST} to resume from")
    if not verifies(path):
        prev = last_good(path.parent, skip=path)
        hint = (f"the previous checkpoint that verifies is {prev}: copy it over {path} to continue from there" if prev
                else "no earlier checkpoint in that folder verifies")
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 is not the one recorded when it was written "
                              f"(in {path.parent / SUMS}); {hint}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file is one line
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
