import fcntl
import os

# Tiny test models run faster and steadier on one thread, and subprocesses inherit the same setting
# (results that compare an in-process run with a subprocess run need the same thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a 2-core machine

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Tokenized corpora go to one folder of this session, never the user's ~/.cache/mst_compile (shared
    by all modules so the built-in corpus is tokenized once); the variable is restored at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MST_COMPILE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def module_env():
    """``monkeypatch`` for module-scoped fixtures: what they set is undone when the module's tests end."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(autouse=True)
def _one_torchrun_at_a_time(request, tmp_path_factory):
    """Tests marked ``torchrun`` take a lock shared by every pytest-xdist worker: two gloo jobs of two ranks
    each on a 2-core machine starve each other, and a starved gloo rank can abort at exit."""
    if request.node.get_closest_marker("torchrun") is None:
        yield
        return
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the folder all workers share
    with open(root / "torchrun.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
