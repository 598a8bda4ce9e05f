"""The benchmarks' one timer: the functions under comparison run in turn, one call of each per round, so
load on a shared machine hits them alike.

The scripts take the minimum of the rounds where other work can only add time (``csr_kernels.py``,
``tiles.py``, ``attention.py``) and the median where they compare typical calls (``export.py``,
``overhead.py``, ``gpu_check.py``). ``mst_compile/timing.py`` is something else: it times a model's
training steps for ``mstc plan``.
"""
from __future__ import annotations

import time
from collections.abc import Callable

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, robust to other jobs


def add_clock_option(parser) -> None:
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: process CPU time, for a machine shared with other jobs (use --threads 1)")


def interleaved(fns: dict[str, Callable[[], object]], reps: int, *, warmup: int = 1, clock: str = "wall",
                alternate: bool = False, device=None) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` timed calls of every function in ``fns``, called in turn.

    ``warmup`` untimed rounds come first (caches, allocator, kernel builds); ``alternate`` reverses the
    order every other timed round, so no function always runs first; on a CUDA ``device`` each timed call
    starts and ends with the device's queue drained."""
    tick = CLOCKS[clock]
    sync = None
    if device is not None and device.type == "cuda":
        import torch

        sync = torch.cuda.synchronize
    for _ in range(warmup):
        for f in fns.values():
            f()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(reps):
        for k in (names[::-1] if alternate and i % 2 else names):
            if sync is not None:
                sync()
            t0 = tick()
            fns[k]()
            if sync is not None:
                sync()
            times[k].append(tick() - t0)
    return times


def best(fns: dict[str, Callable[[], object]], reps: int, clock: str = "wall") -> dict[str, float]:
    """The fastest of ``reps`` interleaved calls of each function after one warm-up round, in seconds."""
    return {k: min(v) for k, v in interleaved(fns, reps, clock=clock).items()}
