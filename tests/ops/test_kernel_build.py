"""The kernel build never hangs a process: stale locks, killed builders, timeouts, per-environment folders."""
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from mst_compile.ops import attention_cpu, kernel_build

NAME = "mst_hsa_test"
ROOT = Path(__file__).resolve().parents[2]


def fake_build(folder: Path) -> None:
    (folder / f"{NAME}.so").write_bytes(b"not really a library")


def holder(root: Path, marker: Path) -> subprocess.Popen:
    """A process that takes the build lock and then 'compiles' for a minute."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mst_compile.ops.kernel_build import build_once
        def slow(folder):
            (folder / "half.o").write_bytes(b"x")
            Path({str(marker)!r}).write_text("building")
            time.sleep(60)
        build_once({NAME!r}, Path({str(root)!r}), slow, 5)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the holder never started building"
        time.sleep(0.05)
    return p


def test_planted_stale_lock_and_half_built_folder_are_taken_over(tmp_path):
    # what a builder killed mid-build leaves: a lock file naming a dead pid, a half-built folder
    (tmp_path / f"{NAME}.lock").write_text("pid 999999 on somehost since 2020-01-01 00:00:00\n")
    half = tmp_path / f".{NAME}-dead"
    half.mkdir()
    (half / "lock").write_text("")  # torch's own FileBaton lock inside it
    t0 = time.monotonic()
    lib, built = kernel_build.build_once(NAME, tmp_path, fake_build, timeout=30)
    assert time.monotonic() - t0 < 2
    assert built and lib == tmp_path / NAME / f"{NAME}.so" and lib.is_file()
    assert not half.exists()
    assert str(os.getpid()) in (tmp_path / f"{NAME}.lock").read_text()


def test_killed_builder_does_not_block_the_next_one(tmp_path):
    p = holder(tmp_path, tmp_path / "started")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(f".{NAME}-*")), "the killed builder should have left its half-built folder"
    t0 = time.monotonic()
    lib, built = kernel_build.build_once(NAME, tmp_path, fake_build, timeout=30)
    assert time.monotonic() - t0 < 2 and built and lib.is_file()
    assert not list(tmp_path.glob(f".{NAME}-*"))


def test_a_waiting_process_times_out_naming_the_lock_and_its_owner(tmp_path):
    p = holder(tmp_path, tmp_path / "started")
    try:
        t0 = time.monotonic()
        with pytest.raises(kernel_build.BuildTimeout) as e:
            kernel_build.build_once(NAME, tmp_path, fake_build, timeout=0.5)
        assert time.monotonic() - t0 < 3
        msg = str(e.value)
        assert str(tmp_path / f"{NAME}.lock") in msg and f"pid {p.pid}" in msg and "MST_HSA_BUILD_TIMEOUT" in msg
        assert "\n" not in msg
    finally:
        p.kill()
        p.wait()


def test_a_finished_build_is_loaded_without_building_or_locking(tmp_path):
    kernel_build.build_once(NAME, tmp_path, fake_build, timeout=1)
    calls = []
    lib, built = kernel_build.build_once(NAME, tmp_path, calls.append, timeout=1)
    assert not built and not calls and lib.is_file()


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def broken(folder):
        (folder / "partial.o").write_bytes(b"x")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        kernel_build.build_once(NAME, tmp_path, broken, timeout=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.lock"]


def test_the_build_folder_depends_on_the_environment(monkeypatch):
    src, flags = "int x;", ["-O3"]
    base = kernel_build.build_key(src, flags, [])
    assert kernel_build.build_key(src, flags, []) == base
    assert kernel_build.build_key(src + " ", flags, []) != base
    assert kernel_build.build_key(src, ["-O2"], []) != base
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert kernel_build.build_key(src, flags, []) != base
    monkeypatch.undo()
    from torch.utils import cpp_extension

    paths = cpp_extension.include_paths()
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/other/include", *paths])
    assert kernel_build.build_key(src, flags, []) != base


def test_timed_out_or_failed_build_falls_back_with_one_warning(monkeypatch):
    def timeout(*a, **k):
        raise kernel_build.BuildTimeout("waited 0.5 s for the build lock /x/mst_hsa.lock, held by pid 1")

    monkeypatch.setattr(attention_cpu, "_state", {})
    monkeypatch.setattr(kernel_build, "build_once", timeout)
    monkeypatch.delenv("MST_HSA_CPP", raising=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert attention_cpu.available() is False
        assert attention_cpu.available() is False
    assert len(w) == 1 and "/x/mst_hsa.lock" in str(w[0].message) and "stock-kernel path" in str(w[0].message)


def test_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setattr(attention_cpu, "_state", {})
    monkeypatch.setenv("MST_HSA_BUILD_TIMEOUT", "soon")
    with pytest.warns(UserWarning, match="MST_HSA_BUILD_TIMEOUT='soon' is not a number"):
        assert attention_cpu.available() is False


@pytest.mark.slow
def test_real_build_killed_mid_compile_then_built_by_the_next_process(tmp_path):
    """The issue's scenario with the real compiler: SIGKILL during the first build, then a new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(tmp_path), "MST_HSA_BUILD_TIMEOUT": "300"}
    env.pop("MST_HSA_CPP", None)
    code = "from mst_compile.ops import attention_cpu; print(attention_cpu.available())"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "mst_compile"
    deadline = time.monotonic() + 120
    while not any(root.glob(".mst_hsa_*/hsa_cpu.cpp")):  # the compiler is at work
        assert first.poll() is None and time.monotonic() < deadline, "the first build never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the builder and its ninja / compiler children
    first.wait()
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert second.stdout.strip() == "True", second.stderr[-2000:]
    assert "Warning" not in second.stderr
    assert not list(root.glob(".mst_hsa_*")) and len(list(root.glob("mst_hsa_*/mst_hsa_*.so"))) == 1
