"""Bad paths and typos fail in one line before any work: output paths are probed, torch is not imported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.errors import MstCompileError
from mst_compile.paths import writable_dir, writable_file

ROOT = Path(__file__).resolve().parents[1]


def one_line(r) -> str:
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_unwritable_paths_are_one_line(tmp_path):
    with pytest.raises(MstCompileError, match=r"/proc/x.onnx cannot be written \(cannot create files in /proc"):
        writable_file("/proc/x.onnx", "export path")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(MstCompileError, match="a_file is not a folder"):
        writable_file(tmp_path / "a_file" / "m.onnx", "export path")
    with pytest.raises(MstCompileError, match="is a folder: pass a file name"):
        writable_file(tmp_path, "export path")
    with pytest.raises(MstCompileError, match="is a file, not a folder"):
        writable_dir(tmp_path / "a_file", "--out")
    with pytest.raises(MstCompileError, match="/proc/run/deeper cannot be written"):
        writable_dir("/proc/run/deeper", "--out")
    # a path whose folders do not exist yet is fine, and checking it creates nothing
    assert writable_dir(tmp_path / "new" / "run", "--out") == tmp_path / "new" / "run"
    assert writable_file(tmp_path / "new" / "m.onnx", "export path") == tmp_path / "new" / "m.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MstCompileError, match="Permission denied"):
            writable_file(ro / "m.onnx", "export path")
    finally:
        ro.chmod(0o755)


def test_failing_commands_do_not_import_torch(tmp_path):
    """Each command fails on a missing file, a bad path or a bad flag before torch is loaded."""
    model = write(tmp_path, "tiny.py", TINY)
    (tmp_path / "blob.dat").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "odd.bin").write_bytes(bytes(101))  # not a whole number of uint16 token ids
    commands = [
        ["train", str(tmp_path / "missing.py")],
        ["train", str(model), "--lr", "abc"],
        ["train", str(model), "--data", str(tmp_path / "missing.txt")],
        ["train", str(model), "--data", str(tmp_path / "blob.dat")],
        ["train", str(model), "--data", str(tmp_path / "odd.bin")],
        ["train", str(model), "--data", str(tmp_path / "blob.dat"), "--text-field", "body"],
        ["train", str(model), "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
        ["train", str(model), "--out", "/proc/run"],
        ["train", str(model), "--resume", str(tmp_path)],
        ["train", str(model), "--config", str(tmp_path / "missing.toml")],
        ["export", str(tmp_path / "missing")],
        ["report", str(tmp_path / "missing")],
    ]
    code = f"""
import json, sys
from mst_compile.cli import main
out = []
for args in {commands!r}:
    try:
        main(args, standalone_mode=False)
        out.append([args, "no error", "torch" in sys.modules])
    except BaseException as e:
        out.append([args, type(e).__name__ + ": " + str(e), "torch" in sys.modules])
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    for args, err, torch_loaded in json.loads(p.stdout):
        assert err != "no error" and "\n" not in err, (args, err)
        assert not torch_loaded, f"{args} imported torch before failing ({err})"  # what made them take seconds


@pytest.fixture(scope="module")
def run(tmp_path_factory, module_env):
    from mst_compile.train.loop import train

    d = tmp_path_factory.mktemp("fast")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    train(write(d, "tiny.py", TINY), out=d / "run", progress=False)
    return d / "run"


def test_export_and_report_check_their_output_before_working(run, tmp_path):
    before = sorted(p.name for p in run.iterdir())
    msg = one_line(CliRunner().invoke(main, ["export", str(run), "-o", "/proc/x.onnx"]))
    assert "--output /proc/x.onnx cannot be written" in msg
    (tmp_path / "f").write_text("")
    msg = one_line(CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "f" / "m.onnx")]))
    assert "is not a folder" in msg
    msg = one_line(CliRunner().invoke(main, ["report", str(run), "--out", "/proc/report"]))
    assert "report folder /proc/report cannot be written" in msg
    assert sorted(p.name for p in run.iterdir()) == before
    # the export fails before torch is imported, i.e. before any of its work
    code = f"""
import sys
from mst_compile.cli import main
try:
    main(["export", {str(run)!r}, "-o", "/proc/x.onnx"], standalone_mode=False)
except Exception as e:
    print(type(e).__name__, "torch" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.split() == ["_Failure", "False"], p.stdout + p.stderr


def test_export_records_the_maximum_sequence_length_and_checks_lengths(run, tmp_path):
    from mst_compile.export import read_metadata, validate_onnx
    from mst_compile.modelfile import load_model_file

    out = tmp_path / "m.onnx"
    msg = one_line(CliRunner().invoke(main, ["export", str(run), "-o", str(out), "--check-lengths", "16,64"]))
    assert "sequence length 64 is beyond the maximum sequence length 32" in msg and not out.exists()
    assert "--check-lengths" in CliRunner().invoke(main, ["export", str(run), "--check-lengths", "x"]).output
    r = CliRunner().invoke(main, ["export", str(run), "--check-lengths", "8", "--no-validate"])
    assert r.exit_code == 2 and "drop --no-validate" in r.output
    r = CliRunner().invoke(main, ["export", str(run), "-o", str(out), "--check-lengths", "7,32"])
    assert r.exit_code == 0 and "also at sequence lengths 7, 32" in r.output, r.output
    assert read_metadata(out)["max_sequence_length"] == 32
    # the validation of the file alone reads the limit from its metadata and says it in one line
    model = load_model_file(run.parent / "tiny.py").model()
    ids = torch.randint(0, 256, (2, 32))
    with pytest.raises(MstCompileError) as e:
        validate_onnx(out, model, (ids,), lengths=[48])
    assert str(e.value) == (f"sequence length 48 is beyond the maximum sequence length 32 of {out} "
                            "(its block size / position embeddings); check lengths up to 32")
