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
