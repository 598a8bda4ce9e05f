"""benchmarks/gpu_check.sh --dry-run: the GPU check script runs end to end on CPU at tiny sizes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, *args: str, timeout: int) -> list[str]:
    """Run the script; return the rows of its table (after the header lines)."""
    env = {**os.environ, "PYTHON": sys.executable, "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FAILED" not in p.stdout
    return p.stdout[p.stdout.index("| section |"):].strip().splitlines()[2:]


def _section(row: str) -> str:
    return row.split("|")[1].strip()


@pytest.mark.slow
def test_dry_run_cuda_tests_and_attention(tmp_path):
    rows = _dry_run(tmp_path, "--only", "hsa", timeout=300)
    assert _section(rows[0]) == "tests" and "skipped" in rows[0]  # no GPU: the CUDA tests skip
    hsa = [r for r in rows if _section(r) == "hsa"]
    assert len(hsa) == 4 and all("speedup" in r and "flop ratio" in r for r in hsa)


@pytest.mark.slow
def test_dry_run_every_section(tmp_path):
    rows = _dry_run(tmp_path, timeout=1500)
    sections = [_section(r) for r in rows]
    assert sections.count("hsa") == 4 and sections.count("train") == 2 and sections.count("onnx") == 2
    assert all("tokens/s" in r for r in rows if _section(r) == "train")
    assert all("max difference to PyTorch" in r for r in rows if _section(r) == "onnx")
