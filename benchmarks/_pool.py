"""Training many benchmark runs side by side: worker processes with one thread each, and a run folder that is
picked up only if it was trained with the settings asked for."""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from multiprocessing import get_context
from pathlib import Path


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def same_run(spec: dict) -> None:
    """Refuse to pick up a run folder trained with another learning rate, schedule, length, seed or batch:
    its result would be reported under this spec's settings."""
    saved = Path(spec["out"]) / "config.toml"
    if not saved.is_file():
        return
    import tomllib

    was = tomllib.loads(saved.read_text()).get("train", {})
    for key in ("steps", "lr", "lr_schedule", "lr_decay", "seed", "batch_size", "block_size"):
        if key in was and key in spec and was[key] != spec[key]:
            raise SystemExit(f"run folder {spec['out']}: trained with {key} = {was[key]!r}, this run asks for {spec[key]!r}; "
                             "pass another --work or remove the folder")


def same_recipe(out: str | Path, cfg) -> None:
    """Refuse to pick up a sparse run folder trained with another MST recipe than ``cfg`` (a folder from before a
    change of the defaults, say): its result would be reported as this recipe's."""
    saved = Path(out) / "config.toml"
    if not saved.is_file():
        return
    from mst_compile import MSTConfig
    from mst_compile.run_config import read_config_file

    was = MSTConfig.from_dict(read_config_file(saved)[1]).to_dict()
    if differ := [f"{k} = {was[k]!r} (now {v!r})" for k, v in cfg.to_dict().items() if was[k] != v]:
        raise SystemExit(f"run folder {out}: trained with another MST recipe ({', '.join(differ)}); "
                         "pass another --work or remove the folder")


def recorded_recipe(record: dict):
    """The MSTConfig a result record ran (None for a dense run); a record older than a key ran at its value of then."""
    from mst_compile import MSTConfig
    from mst_compile.run_config import upgrade_saved

    if record.get("mst_config") is None:
        return None
    try:
        return MSTConfig.from_dict(upgrade_saved(record["mst_config"], {}))
    except (TypeError, ValueError) as e:  # a record from before a key was removed: no recipe of today's
        return f"unreadable: {e}"


_SHARED: dict[int, ProcessPoolExecutor] = {}  # jobs -> the pool a ``workers`` block keeps for its run_pool calls


@contextmanager
def workers(jobs: int):
    """Keep one pool of ``jobs`` worker processes for every ``run_pool`` call inside the block: a benchmark
    that trains in several rounds (a screen, its widening, the other seeds) starts its workers once."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        _SHARED[jobs] = pool
        try:
            yield pool
        finally:
            del _SHARED[jobs]


def run_pool(specs: list[dict], jobs: int, fn, then=None):
    """Run ``fn(spec)`` for every spec, ``jobs`` at a time with one thread each,
    yielding (spec, result) as each finishes with a progress line. ``then(spec, result)`` may return
    further specs, which join the queue (a run sized by another run's result)."""
    t0 = time.time()
    with nullcontext(_SHARED[jobs]) if jobs in _SHARED else workers(jobs) as pool:
        for s in specs:  # before any training starts
            same_run(s)
        pending = {pool.submit(fn, s): s for s in specs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                s = pending.pop(f)
                r = f.result()
                print(f"[{time.time() - t0:7.0f}s] {s['name']:18s} val {r['val_loss']:.4f}  FLOPs {r['mst_flops']:.3e}  "
                      f"reduction {r['dense_flops'] / r['mst_flops']:.2f}x  ({r['wall_s']:.0f}s)", flush=True)
                for extra in (then(s, r) if then else None) or ():
                    same_run(extra)
                    pending[pool.submit(fn, extra)] = extra
                yield s, r
