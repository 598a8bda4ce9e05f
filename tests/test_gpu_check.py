"""benchmarks/gpu_check.sh --dry-run: the GPU check script runs end to end on CPU at tiny sizes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("| section |"):].strip().splitlines()
    sections = [line.split("|")[1].strip() for line in table[2:]]
    assert sections[0] == "tests" and "skipped" in table[2]  # no GPU: the CUDA tests skip
    assert sections.count("hsa") == 4 and sections.count("train") == 2 and "onnx" in sections
    assert "FAILED" not in p.stdout
    for line in table[2:]:
        if line.split("|")[1].strip() == "hsa":
            assert "speedup" in line and "flop ratio" in line
        if line.split("|")[1].strip() == "train":
            assert "tokens/s" in line
