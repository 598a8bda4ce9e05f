"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard (when installed) and the progress display.

``metrics.jsonl`` has one JSON object per line with a ``kind``: ``train`` (step, phase, loss, lr,
density, attention, cumulative FLOPs, tokens/s), ``eval`` (train/val loss, per-layer densities),
``update`` (one topology update: pruned, grown, ever-active share).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .. import run_folder as rf


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash ends the readable part
    return out


def _clean(v):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsLog:
    """Appends to metrics.jsonl and mirrors scalars to TensorBoard if ``tensorboard`` imports."""

    def __init__(self, folder: Path, keep_until_step: int | None = None):
        self.path = folder / rf.METRICS
        if keep_until_step is not None:  # resuming: drop lines past the checkpoint, they are redone
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= keep_until_step]
            from ..checkpoint import write_text_atomic

            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.tb = None
        try:
            import importlib

            importlib.import_module("tensorboard")  # torch's SummaryWriter imports it lazily: fail here
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / rf.TENSORBOARD), purge_step=keep_until_step)
        except Exception:  # TensorBoard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(_clean(record)) + "\n")
        self.file.flush()
        if self.tb is not None:
            kind, step = record.get("kind", "train"), record["step"]
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def human(n: float) -> str:
    """1.23e+12 -> '1.23T'."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class Progress:
    """A tqdm bar on a terminal; plain log lines every ``every`` steps otherwise; nothing if quiet."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True):
        self.total, self.every, self.enabled = total, every, enabled
        self.bar = None
        self.t0, self.s0 = time.time(), start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(self._fmt(fields), refresh=False)
        elif step % self.every == 0 or step == self.total:
            done = step - self.s0
            eta = (time.time() - self.t0) / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total} {self._fmt(fields)} eta {duration(eta)}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line that must not be overwritten by the bar (evaluations, checkpoints)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    @staticmethod
    def _fmt(f: dict) -> str:
        parts = [f"{f['phase']}", f"loss {f['loss']:.4f}"]
        if f.get("density") is not None:
            parts.append(f"density {f['density']:.3f}")
        if f.get("reduction"):
            parts.append(f"alg. FLOPs /{f['reduction']:.2f}")
        return " ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
