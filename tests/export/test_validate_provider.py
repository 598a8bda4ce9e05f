"""mstc export --provider: per-output differences, and a clear line when onnxruntime-gpu is missing."""

import pytest
import torch
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main

ort = pytest.importorskip("onnxruntime")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def run(tmp_path_factory, module_env):
    d = tmp_path_factory.mktemp("provider")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    f = write(d, "tiny.py", TINY)
    r = CliRunner().invoke(main, ["train", str(f), "--steps", "8", "--update-interval", "1", "--out", str(d / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    return d / "run"


@pytest.mark.slow
def test_cpu_reports_every_output(run, tmp_path):
    r = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("onnxruntime (cpu) matches PyTorch within 0.0001: max |difference| per output: ")
    names = [o.name for o in ort.InferenceSession(str(tmp_path / "m.onnx")).get_outputs()]
    for name in names:
        assert f"{name} " in line.split("per output: ")[1]


@pytest.mark.skipif(HAS_CUDA_EP, reason="checks the error of an onnxruntime without CUDA")
def test_cuda_provider_missing_is_one_line(tmp_path):
    run = tmp_path / "run"  # the provider is checked before the run is even read
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    r = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "m.onnx"), "--provider", "cuda"])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert "no CUDAExecutionProvider" in r.output and "mst-compile[gpu]" in r.output
    assert not (tmp_path / "m.onnx").exists(), "the check comes before any export work"


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA_EP and torch.cuda.is_available()), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_provider_validates(run, tmp_path):
    for attention in ("dense", "sparse"):
        r = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / f"{attention}.onnx"),
                                      "--provider", "cuda", "--attention", attention])
        assert r.exit_code == 0, r.output
        assert "onnxruntime (cuda) matches PyTorch" in r.output
