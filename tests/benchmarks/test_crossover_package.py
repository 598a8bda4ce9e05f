"""benchmarks/csr_kernels.py and tiles.py --package: the crossover each writes, computed from fabricated
per-layer rows (no benchmark runs), and the file written keeps the other kernel's entry."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ("768x768", "3072x768")


@pytest.fixture
def bench(monkeypatch):
    """Load a benchmark script as a module; sys.path and sys.modules are restored after the test."""
    def load(name: str):
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        return mod
    return load


def _speedups(speedup: dict[float, float], dense=100.0):
    """(density, dense ms, kernel ms) with the kernel ``speedup[d]`` times faster at density d."""
    return [(d, dense, dense / s) for d, s in speedup.items()]


def test_csr_crossover_is_the_lowest_break_even_of_the_shapes(bench):
    kernels = bench("csr_kernels")
    rows = [dict(shape="768x768", density=d, dense=a, csr=b) for d, a, b in _speedups({0.1: 2.0, 0.2: 1.0, 0.5: 0.5})]
    rows += [dict(shape="3072x768", density=d, dense=a, csr=b) for d, a, b in _speedups({0.1: 2.0, 0.3: 1.0, 0.5: 0.5})]
    entry = kernels.csr_entry(rows, "cmd", 1024)
    assert entry["measured"]["break_even"] == {"cmd": {"768x768": 0.2, "3072x768": 0.3}}
    assert entry["density"] == 0.2 and entry["source"].startswith("benchmarks/csr_kernels.py --package")
    never = [dict(r, csr=r["dense"] * 2) for r in rows if r["shape"] == "3072x768"]  # CSR never faster on one shape
    assert kernels.csr_entry(rows[:3] + never, "cmd", 1024)["density"] == 0.0


def test_tile_crossovers_per_edge_are_the_lowest_break_even_of_the_shapes(bench):
    tiles = bench("tiles")
    speedups = {(16, "768x768"): {0.1: 2.0, 0.25: 1.0, 0.5: 0.5}, (16, "3072x768"): {0.1: 2.0, 0.4: 1.0, 0.5: 0.5},
                (8, "768x768"): {0.05: 0.5}, (8, "3072x768"): {0.05: 2.0, 0.1: 0.5},  # 8: never faster on one shape
                (32, "768x768"): {0.1: 3.0, 0.7: 1.5}, (32, "3072x768"): {0.1: 3.0, 0.7: 1.2}}  # 32: faster everywhere measured
    rows = [dict(shape=s, tile=b, target=d, density=d, dense=a, tile_ms=k) for (b, s), sp in speedups.items() for d, a, k in _speedups(sp)]
    entry = tiles.tile_entry(rows, "cmd", 1024)
    assert entry["density"] == {"8": 0.0, "16": 0.25, "32": 0.7}
    be = entry["measured"]["break_even"]["cmd"]
    assert be["8"]["768x768"] is None and be["8"]["3072x768"] == pytest.approx(0.07) and be["16"] == {"768x768": 0.25, "3072x768": 0.4}


def test_package_writes_one_entry_and_keeps_the_other(tmp_path, bench):
    kernels = bench("csr_kernels")
    path = tmp_path / "kernel_crossovers.json"
    shipped = json.loads(kernels.CROSSOVERS.read_text())
    path.write_text(json.dumps(shipped))
    kernels.package_crossover("csr", {"density": 0.3}, path)
    assert json.loads(path.read_text()) == {**shipped, "csr": {"density": 0.3}}
    assert kernels.CROSSOVERS.read_text() == json.dumps(shipped, indent=1) + "\n"  # the shipped file, as --package writes it
