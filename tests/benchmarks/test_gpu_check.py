"""benchmarks/gpu_check.sh --dry-run: both parts of the GPU check run end to end on CPU at tiny sizes,
and every row lands in the table file as it is measured."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(tmp_path, only: str, timeout: int) -> tuple[list[str], list[str]]:
    """Run one part; return the rows of its printed table and of its table file."""
    env = {**os.environ, "PYTHON": sys.executable, "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", only], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FAILED" not in p.stdout
    printed = p.stdout[p.stdout.index("| section "):].strip().splitlines()[2:]
    written = [ln for ln in (tmp_path / "gpu_check.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    return printed, written[1:]  # without the header row


def _section(row: str) -> str:
    return row.split("|")[1].strip()


@pytest.mark.slow
def test_dry_run_part_one_kernels_and_attention(tmp_path):
    rows, written = _dry_run(tmp_path, "kernels,attention", timeout=300)
    kernels = [r for r in rows if _section(r) == "kernels"]
    assert len(kernels) == 8 and all("cuBLAS" in r and "speedup" in r for r in kernels)
    assert sum("max abs difference to masked dense" in r for r in kernels) == 4  # the first density of each tile is checked against masked dense
    attention = [r for r in rows if _section(r) == "attention"]
    assert len(attention) == 4 and all("speedup" in r and "flop ratio" in r for r in attention)
    assert len(written) == len(rows) and [_section(r) for r in written] == [_section(r) for r in rows]


@pytest.mark.slow
def test_dry_run_part_two_train_and_tests(tmp_path):
    rows, _ = _dry_run(tmp_path, "train,tests", timeout=600)
    train = [r for r in rows if _section(r) == "train"]
    assert len(train) == 3 and all("tokens/s" in r for r in train)
    # the tiled MST step runs the tile kernel (the tied embedding, masked by element, the masked dense op)
    assert "kernels dense/tile" in train[1] and "8x8 tiles" in train[1]
    tests = [r for r in rows if _section(r) == "tests"]
    assert len(tests) == 1 and "skipped" in tests[0]  # no GPU: the CUDA tests skip
