import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mst_compile.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch():
    code = "import sys; from mst_compile.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout


def test_inspect_prints_plan_table():
    r = CliRunner().invoke(main, ["inspect", str(ROOT / "examples" / "tiny_gpt.py")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["site", "kind", "shape", "params"]
    body = [line for line in lines if line.startswith("h.0.attn.c_attn.weight")]
    assert body and "384x128" in body[0] and "49,152" in body[0]
    total = [line for line in lines if line.startswith("total")][0]
    assert "0.150" in total and "100.0%" in total  # the default s_max = 0.85


@pytest.mark.parametrize("example,sites", [("hf_gpt2", 17), ("hf_llama", 29)])
def test_inspect_hf_examples(example, sites):
    r = CliRunner().invoke(main, ["inspect", str(ROOT / "examples" / f"{example}.py")])
    assert r.exit_code == 0, r.output
    linear_rows = [line for line in r.output.splitlines() if line.split()[1:2] == ["linear"]]
    assert len(linear_rows) == sites and "captured with export" in r.output


def test_inspect_without_model_function_exits_2(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "does not define model()" in r.output


def test_inspect_missing_or_raising_file(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.py")])
    assert r.exit_code == 2 and "does not exist" in r.output
    f = tmp_path / "bad.py"
    f.write_text("def model():\n    raise RuntimeError('boom')\n")
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 2 and "model() raised RuntimeError: boom" in r.output
    assert "Traceback" not in r.output


def test_inspect_real_subprocess_one_line_error(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def model():\n    return 3\n")
    p = subprocess.run([sys.executable, "-m", "mst_compile", "inspect", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip() == f"Error: {f}: model() returned int, expected a torch.nn.Module"


def test_inspect_lists_what_the_linear_pass_could_not_rewrite(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom _models import Unrewritable\n\n"
                 "def model():\n    return Unrewritable()\n")
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 0, r.output
    assert "skipped: 4" in r.output
    assert "skipped summed: einsum 'btd,de->bt' does not contract the parameter like a linear layer" in r.output
    assert "skipped scaled: the operand is computed from the parameter" in r.output
