"""crossovers.py: the kernel crossovers ship as package data with today's measured values and their
provenance, and the kernel choice reads them from there."""
import pytest

from mst_compile.constants import TILES
from mst_compile.ops import crossovers, tile_cpu
from mst_compile.ops.csr import choose_linear_kernel
from mst_compile.ops.tile_linear import choose_tile_kernel


def test_the_shipped_file_holds_the_measured_crossovers():
    assert crossovers.csr_crossover() == 0.18
    assert {b: crossovers.tile_crossover(b) for b in TILES} == {8: 0.05, 16: 0.3, 32: 0.5, 64: 0.67, 128: 0.69}
    doc = crossovers.kernel_crossovers()
    for kind, script in (("csr", "benchmarks/csr_kernels.py"), ("tile", "benchmarks/tiles.py")):
        assert doc[kind]["source"].startswith(script + " --package") and doc[kind]["results"]
        assert doc[kind]["measured"]["date"] and all(script in cmd for cmd in doc[kind]["measured"]["break_even"])
    runs = doc["csr"]["measured"]["break_even"].values()
    assert min(d for run in runs for d in run.values()) == doc["csr"]["density"]  # the lowest break-even measured


def test_the_file_is_read_once():
    assert crossovers.kernel_crossovers() is crossovers.kernel_crossovers()


@pytest.fixture
def fake(monkeypatch):
    doc = {"csr": {"density": 0.6}, "tile": {"density": {str(b): 0.8 for b in TILES}}}
    monkeypatch.setattr(crossovers, "kernel_crossovers", lambda: doc)
    return doc


def test_choose_linear_kernel_reads_the_file(fake):
    assert choose_linear_kernel(0.5, "cpu", (768, 768)) == "csr"  # above the shipped 0.18, below the file's 0.6
    fake["csr"]["density"] = 0.4
    assert choose_linear_kernel(0.5, "cpu", (768, 768)) == "dense"


def test_choose_tile_kernel_reads_the_file(fake, monkeypatch):
    monkeypatch.setattr(tile_cpu, "available", lambda: True)
    assert choose_tile_kernel("w", 0.5, "cpu", (768, 768), 8) == "tile"  # the shipped file never takes 8x8 tiles
    fake["tile"]["density"]["8"] = 0.0
    assert choose_tile_kernel("w", 0.5, "cpu", (768, 768), 8) == "dense"
