"""Checkpoints carry checksums: corrupt files are refused by resume and export, K are kept, temp files cleaned."""
import os
from pathlib import Path

import pytest
import torch
from _train_models import NAN_AT_6, TINY, write
from click.testing import CliRunner

from mst_compile import checkpoint as ckpt
from mst_compile.cli import main
from mst_compile.errors import CheckpointError


def flip(path: Path, at: float = 0.5, n: int = 1) -> None:
    """Flip ``n`` bytes in the middle of ``path`` (tensor data: torch.load still succeeds)."""
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    for k in range(i, i + n):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


def state(step: int) -> dict:
    return {"format": ckpt.FORMAT, "step": step, "w": torch.full((64, 64), float(step))}


def test_keeps_the_newest_k_and_last_is_the_newest(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(state(step), tmp_path, keep=3)
    ckpt.save_checkpoint(state(4), tmp_path, keep=3, best=True)
    assert [p.name for p in ckpt.step_files(tmp_path)] == ["step-0000005.pt", "step-0000004.pt", "step-0000003.pt"]
    assert (tmp_path / "last.pt").samefile(tmp_path / "step-0000005.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "sha256sums", "step-0000003.pt",
                                                          "step-0000004.pt", "step-0000005.pt"]
    names = [line.split()[2] for line in (tmp_path / "sha256sums").read_text().splitlines()]
    assert names == ["step-0000003.pt", "step-0000004.pt", "step-0000005.pt", "best.pt"]
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["step"] == 4


def test_one_flipped_byte_is_refused_naming_the_previous_good_checkpoint(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(state(step), tmp_path, keep=2)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    flip(tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2  # torch itself does not notice
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(tmp_path / "last.pt")
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {tmp_path / 'last.pt'} is corrupt" in msg
    assert f"the previous checkpoint that verifies is {tmp_path / 'step-0000001.pt'}" in msg
    flip(tmp_path / "step-0000001.pt", at=0.9, n=64)
    with pytest.raises(CheckpointError, match="no earlier checkpoint in that folder verifies"):
        ckpt.load_checkpoint(tmp_path / "last.pt")
    assert ckpt.last_good(tmp_path) is None


def test_a_crash_between_record_and_rename_keeps_both_files_good(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path, keep=2)
    real = os.replace

    def killed(src, dst):
        if str(dst).endswith("step-0000002.pt"):
            raise KeyboardInterrupt  # a kill right after the digest was recorded
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(state(2), tmp_path, keep=2)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_folders_from_before_checksums_still_load(tmp_path):
    ckpt.save_atomic(state(3), tmp_path / "last.pt")
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_keep_checkpoints_is_validated():
    from mst_compile.train.options import TrainConfig

    with pytest.raises(ValueError, match="keep_checkpoints=1 is invalid: expected an integer >= 2"):
        TrainConfig(keep_checkpoints=1)


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """A tiny run stopped after step 10 (checkpoints at 8 and 10)."""
    from mst_compile.train.loop import TrainingInterrupted, train

    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    f = write(tmp_path, "tiny.py", TINY)
    with pytest.raises(TrainingInterrupted):
        train(f, out=tmp_path / "run", progress=False, stop_at=10)
    return f, tmp_path / "run"


def test_resume_and_export_refuse_a_corrupt_checkpoint_and_clean_temp_files(stopped):
    f, run = stopped
    cks = run / "checkpoints"
    assert [p.name for p in ckpt.step_files(cks)] == ["step-0000010.pt", "step-0000008.pt"]
    flip(cks / "last.pt")
    r = CliRunner().invoke(main, ["export", str(run), "-o", str(run / "m.onnx")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "is corrupt" in r.output and str(cks / "step-0000008.pt") in r.output
    assert not (run / "m.onnx").exists()
    # what a kill mid-write leaves: 0-byte temp files beside the checkpoint and the run's text files
    leftovers = [cks / ".last.pt.k1ll3d.tmp", cks / ".step-0000012.pt.abcd.tmp", run / ".summary.json.x.tmp"]
    for p in leftovers:
        p.write_bytes(b"")
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--quiet"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"checkpoint {cks / 'last.pt'} is corrupt" in r.output and str(cks / "step-0000008.pt") in r.output
    assert not any(p.exists() for p in leftovers)
    # the way out the message gives works
    (cks / "last.pt").unlink()
    (cks / "last.pt").write_bytes((cks / "step-0000008.pt").read_bytes())
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    assert ckpt.load_checkpoint(cks / "last.pt")["step"] == 24


# NAN_AT_6, but the 6th batch also corrupts the newest checkpoint (step 4) before poisoning the weights
CORRUPT_THEN_NAN = NAN_AT_6.replace('''            if _calls["train"] >= 6:''', '''            if _calls["train"] == 6:
                import os
                p = os.environ["MST_TEST_CORRUPT"]
                raw = bytearray(open(p, "rb").read())
                raw[len(raw) // 2] ^= 0xFF
                open(p, "wb").write(bytes(raw))
            if _calls["train"] >= 6:''')


def test_nan_names_a_checkpoint_that_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "nan"
    monkeypatch.setenv("MST_TEST_CORRUPT", str(out / "checkpoints" / "step-0000004.pt"))
    f = write(tmp_path, "nan.py", CORRUPT_THEN_NAN)
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(out), "--checkpoint-interval", "2", "--quiet"])
    assert r.exit_code == 1 and "loss became nan at step 5" in r.output, r.output
    assert f"the last good checkpoint (checksum verified) is {out / 'checkpoints' / 'step-0000002.pt'}" in r.output
    assert "last.pt" not in r.output


# an unused parameter turns NaN at the 6th batch: the loss stays finite, the step-8 checkpoint must not be written
NAN_WEIGHT = NAN_AT_6.replace('''    m.register_buffer("poison", torch.zeros(()))''', '''    m.unused = torch.nn.Parameter(torch.zeros(3))''').replace(
    '''m.lm_head.weight.data.fill_(float("nan"))''', '''m.unused.data.fill_(float("nan"))''')


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    monkeypatch.setenv("MST_COMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "w"
    r = CliRunner().invoke(main, ["train", str(write(tmp_path, "w.py", NAN_WEIGHT)), "--out", str(out),
                                  "--checkpoint-interval", "4", "--quiet"])
    assert r.exit_code == 1 and "weight unused became non-finite at step 8" in r.output, r.output
    assert str(out / "checkpoints" / "last.pt") in r.output
    assert ckpt.load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
