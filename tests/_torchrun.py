"""Launch one of the tests' worker scripts (tests/_*_worker.py) on gloo ranks under torchrun."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def end_rank() -> None:
    """The last line of a worker: wait for every rank, close the group and leave at once.

    ``os._exit`` skips the interpreter's teardown, where a gloo thread still being destroyed made a
    finished rank abort now and then ("terminate called without an active exception") under load.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_ranks(worker: str, *args, timeout: int = 180, ranks: int = 2) -> None:
    """``torchrun --nproc_per_node RANKS tests/<worker> ARGS`` with one thread per rank; fails the test with the outputs' tails."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(HERE / worker), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
