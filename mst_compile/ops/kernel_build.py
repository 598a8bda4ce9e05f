"""Build a C++ extension once per environment, without ever hanging a process that waits for it.

torch's ``cpp_extension.load`` keeps one build folder per extension name, guarded by a lock file that
a killed builder leaves behind (every later process then waits on it forever), and it rebuilds
whenever another environment used the same folder (its ``build.ninja`` holds the include paths).
Here instead:

- the folder name carries a hash of everything that changes the binary (source, flags, torch version
  and C++ ABI, Python version and prefix, include paths, compiler), so environments never share one;
- a build runs in a private temporary folder that is renamed into place when it is complete, so a
  finished folder is loaded directly: no ninja run, no lock;
- the build holds ``fcntl.flock`` on ``<name>.lock``, which the operating system drops when its owner
  dies: a killed builder blocks nobody, and the next process cleans its half-built folder. The lock
  file records the owner (pid, host, start time) for the message of a process that gives up waiting
  after ``timeout`` seconds.

Importing this module does not import torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_ARCH = {  # the instruction sets ATen itself dispatched to on this CPU (not -march=native: caches get shared)
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}


class BuildTimeout(RuntimeError):
    """Another process held the build lock for longer than the timeout."""


def build_key(source: str, cflags: list[str], ldflags: list[str]) -> str:
    """12 hex digits over everything that changes the built library."""
    import torch
    from torch.utils import cpp_extension

    parts = [source, *cflags, "|", *ldflags, "|", torch.__version__, str(torch.version.git_version),
             str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.version, sys.implementation.cache_tag, sys.prefix,
             *cpp_extension.include_paths(), os.environ.get("CXX", "c++")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def cpu_flags() -> list[str]:
    """Compiler flags of the CPU kernels: -O3, OpenMP, and the vector ISA ATen uses on this CPU."""
    import torch

    return ["-O3", "-fopenmp", *_ARCH.get(torch.backends.cpu.get_cpu_capability(), [])]


def build_timeout() -> float:
    """Seconds a process waits for another's build of a CPU kernel (``MST_HSA_BUILD_TIMEOUT``, default 300)."""
    raw = os.environ.get("MST_HSA_BUILD_TIMEOUT", "300")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"MST_HSA_BUILD_TIMEOUT={raw!r} is not a number of seconds") from None


def load_extension(prefix: str, source_file: Path) -> None:
    """Build ``source_file`` (a ``TORCH_LIBRARY`` of custom ops) once per environment and load it.

    Raises whatever stops the build (no compiler, ``BuildTimeout``); the caller falls back."""
    import torch

    source = source_file.read_text()
    flags, ldflags = cpu_flags(), ["-fopenmp"]
    name = f"{prefix}_{build_key(source, flags, ldflags)}"

    def compile_into(folder: Path) -> None:  # builds folder/name.so and loads it
        from torch.utils import cpp_extension

        src = folder / source_file.name
        src.write_text(source)
        cpp_extension.load(name, [str(src)], extra_cflags=flags, extra_ldflags=ldflags, is_python_module=False,
                           build_directory=str(folder), verbose=False)

    lib, loaded = build_once(name, build_root(), compile_into, build_timeout())
    if not loaded:
        torch.ops.load_library(str(lib))


def build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR/mst_compile``, else torch's default extensions cache + ``/mst_compile``."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base is None:
        from torch.utils import cpp_extension

        base = cpp_extension.get_default_build_root()
    return Path(base) / "mst_compile"


def build_once(name: str, root: Path, build: Callable[[Path], None], timeout: float) -> tuple[Path, bool]:
    """``(root/name/name.so, built_here)``: ``build(folder)`` writes ``folder/name.so`` when it is missing.

    ``built_here`` says that ``build`` ran in this process (and may have loaded the library already).
    Raises ``BuildTimeout`` after waiting ``timeout`` seconds for another builder.
    """
    final = root / name
    lib = final / f"{name}.so"
    if lib.is_file():
        return lib, False
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{name}.lock", timeout):
        if lib.is_file():  # another process finished while we waited
            return lib, False
        for stale in root.glob(f".{name}-*"):  # half-built folders of killed builders
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not ours: only a complete build is ever renamed here
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(tmp)
            if not (tmp / lib.name).is_file():
                raise RuntimeError(f"the build in {tmp} did not produce {lib.name}")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like torch's own
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return lib, True


@contextlib.contextmanager
def _locked(path: Path, timeout: float):
    """Hold an exclusive ``flock`` on ``path``; poll for at most ``timeout`` seconds."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the compiler's processes
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    raise BuildTimeout(
                        f"waited {timeout:g} s for the build lock {path}, held by {owner}; if that process is "
                        "still building, let it finish (later runs load its result); if it hangs, stop it and the "
                        "lock goes with it. MST_HSA_BUILD_TIMEOUT sets the wait in seconds, MST_HSA_CPP=0 skips "
                        "the kernel") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock
