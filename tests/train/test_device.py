"""Device plumbing that CPU can check: --device errors, the DDP backend, CUDA checkpoints resumed on CPU."""
import json
import os

import pytest
import torch
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.train import distributed
from mst_compile.train.loop import TrainingInterrupted, train


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    f = write(tmp_path, "m.py", TINY)
    r = CliRunner().invoke(main, ["train", str(f), "--device", "cuda", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2
    assert "device 'cuda' was asked for but CUDA is not available; use --device cpu" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_ddp_backend_follows_the_device(monkeypatch):
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda:1")) == "nccl"
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    d = distributed.setup("cpu")
    assert seen == {"backend": "gloo", "device_id": None} and d.rank == 1 and d.device == torch.device("cpu")


def _save_as_if_on_cuda(obj, path):
    """torch.save with every storage tagged "cuda:0", as a checkpoint written on a GPU is."""
    registry = torch.serialization._package_registry
    saved = list(registry)
    registry.insert(0, (-1, lambda storage: "cuda:0", lambda storage, location: None))
    try:
        torch.save(obj, path)
    finally:
        registry[:] = saved


@pytest.mark.skipif(torch.cuda.is_available(), reason="proves the mapping on a machine without CUDA")
def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    f = write(tmp_path, "m.py", TINY)
    whole = train(f, out=tmp_path / "whole", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(f, out=tmp_path / "split", progress=False, stop_at=9)
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    _save_as_if_on_cuda(torch.load(last, weights_only=True), last)
    from mst_compile import checkpoint as ckpt

    sums = last.parent / ckpt.SUMS  # the trainer records each file's digest as it writes it, on a GPU too
    sums.write_text(sums.read_text() + f"{ckpt.sha256(last)}  9  {ckpt.step_files(last.parent)[0].name}\n")
    with pytest.raises(RuntimeError, match="CUDA"):  # without map_location this file needs a GPU
        torch.load(last, weights_only=True)
    split = train(f, resume=tmp_path / "split", progress=False)
    assert split["steps"] == whole["steps"] and split["val_loss"] == whole["val_loss"]
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a["mst"]["mst"]["masks"][n], m) for n, m in b["mst"]["mst"]["masks"].items())
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())


# -- on a GPU --------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cpu_checkpoint_resumes_on_cuda_and_back(tmp_path, monkeypatch):
    """A run started on CPU continues on the GPU, and its GPU checkpoint continues on CPU again."""
    import subprocess
    import sys
    from pathlib import Path

    f = write(tmp_path, "m.py", TINY)
    run = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "MST_COMPILE_CACHE": str(tmp_path / "cache")}
    on_cpu = ("import sys; from mst_compile.train.loop import train; "
              "train(sys.argv[1], out=sys.argv[2] if sys.argv[3] == 'new' else None, "
              "resume=sys.argv[2] if sys.argv[3] != 'new' else None, progress=False, stop_at=int(sys.argv[4]))")

    def cpu_part(mode: str, stop: int) -> None:
        p = subprocess.run([sys.executable, "-c", on_cpu, str(f), str(run), mode, str(stop)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 or "TrainingInterrupted" in p.stderr, p.stderr[-2000:]

    cpu_part("new", 8)
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))  # the data the CPU part tokenized
    with pytest.raises(TrainingInterrupted):  # device "auto": this part runs on the GPU
        train(f, resume=run, progress=False, stop_at=16)
    ck = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 16
    cpu_part("resume", 24)
    assert json.loads((run / "summary.json").read_text())["steps"] == 24
