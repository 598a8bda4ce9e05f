import subprocess
import sys
from pathlib import Path

import pytest
from _train_models import UNCAPTURABLE
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
    assert "captured with fx, per block (h, 4 blocks); skipped: 0" in r.output


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


# fx cannot trace the hand-written masked attention: only torch.export captures it, from inputs
NEEDS_EXPORT = f"""
import sys
sys.path.insert(0, {str(ROOT / "examples")!r})
from tiny_gpt import GPT

def model():
    return GPT(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, flash=False)
"""


@pytest.mark.parametrize("hook", ["", "\ndef batch(tokens):\n    return {'idx': tokens}\n"], ids=["token-batch", "batch-hook"])
def test_inspect_captures_a_file_as_train_does(tmp_path, hook):
    """Without example_inputs() train captures with a batch of token ids (through batch(tokens) when
    the file has it, ModelFile.capture_inputs); inspect used to pass nothing and failed on every model
    fx cannot trace."""
    f = tmp_path / "m.py"
    f.write_text(NEEDS_EXPORT + hook)
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 0, r.output
    assert "captured with export, per block (h, 2 blocks); skipped: 0" in r.output  # fx cannot trace its blocks
    rows = [line.split() for line in r.output.splitlines()]
    assert sum(row[1:2] == ["linear"] for row in rows) == 9 and sum(row[1:2] == ["attention"] for row in rows) == 2


def test_inspect_advice_names_the_model_file_hooks(tmp_path):
    f = tmp_path / "unc.py"
    f.write_text(UNCAPTURABLE)
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{f}: cannot capture M" in r.output and "define example_inputs() in unc.py" in r.output
    assert "example_inputs=" not in r.output and "filter_fn" not in r.output  # the Python API's advice



def test_inspect_shows_attention_depth_per_site(tmp_path):
    f = tmp_path / "deep.py"
    f.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\nfrom tiny_gpt import GPT\nimport mst_compile\n"
                 "def model():\n    return GPT(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_embd=32)\n"
                 "def config():\n    return mst_compile.MSTConfig(attention_depth=0.5)\n")
    r = CliRunner().invoke(main, ["inspect", str(f)])
    assert r.exit_code == 0, r.output
    pattern = {line.split()[0]: line.split()[-2] for line in r.output.splitlines() if line.split()[1:2] == ["attention"]}
    assert pattern == {"h.0.attn": "sparse", "h.1.attn": "sparse", "h.2.attn": "dense", "h.3.attn": "dense"}
