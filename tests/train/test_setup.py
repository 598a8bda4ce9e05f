"""train/setup.py called directly (the CLI's end-to-end refusals are in tests/train/test_loop.py): the run
folder checks, what ``setup`` builds (the seeded model, AdamW's weight-decay split, the first batch), and a
resume restoring weights, position and elapsed time from a checkpoint."""
import dataclasses
import hashlib
import math
import shutil
import time
from datetime import datetime

import pytest
import tomllib
import torch
from _train_models import TINY, write

import mst_compile.train.setup as setup_mod
from mst_compile.errors import MstCompileError
from mst_compile.modelfile import load_model_file
from mst_compile.train.distributed import Dist
from mst_compile.train.loop import _checkpoint
from mst_compile.train.options import configs_for_model_file


def _configs(mf, **train):
    tc, mst = configs_for_model_file(mf, None, {}, {})
    return dataclasses.replace(tc, **train), mst


def _setup(mf, tc, mst, **kw):
    kw = {"out": None, "resume": None, "progress": False, "t_start": time.time(), **kw}
    return setup_mod.setup(mf, tc, mst, Dist(), **kw)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One new run of the tiny model (nothing trained), and the model file it came from."""
    d = tmp_path_factory.mktemp("setup")
    mf = load_model_file(write(d, "tiny.py", TINY))
    tc, mst = _configs(mf, seed=7, weight_decay=0.05, lr=2e-3, beta1=0.8, beta2=0.9)
    run = _setup(mf, tc, mst, out=d / "run")
    run.log.close()
    return d, mf, run


# ---- the run folder ----------------------------------------------------------------------------------

def test_out_that_holds_something_is_refused_naming_resume(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(MstCompileError) as e:
        setup_mod._check_out(str(full), None, tmp_path / "m.py", False)
    assert _one_line(e) == (f"--out {full} already exists and is not empty; pass --resume {full} to continue that run, "
                            "or choose another --out")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(MstCompileError, match=r"--out .*a_file already exists and is not empty; pass --resume"):
        setup_mod._check_out(str(a_file), None, tmp_path / "m.py", False)
    assert (full / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"


def test_out_that_is_empty_or_missing_is_taken_and_not_created(tmp_path):
    (tmp_path / "empty").mkdir()
    assert setup_mod._check_out(str(tmp_path / "empty"), None, tmp_path / "m.py", False) == tmp_path / "empty"
    assert setup_mod._check_out(str(tmp_path / "new" / "run"), None, tmp_path / "m.py", True) == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()


def test_resume_needs_a_run_folder_and_no_other_out(tmp_path):
    with pytest.raises(MstCompileError) as e:
        setup_mod._check_out(None, str(tmp_path), tmp_path / "m.py", False)
    assert _one_line(e) == f"--resume {tmp_path}: not a run folder (no config.toml); pass the folder mstc train wrote"
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(MstCompileError) as e:
        setup_mod._check_out(str(tmp_path / "other"), str(tmp_path), tmp_path / "m.py", False)
    assert _one_line(e) == f"--resume {tmp_path} continues in that folder; drop --out {tmp_path / 'other'}"
    # the same folder spelled another way is the resume itself, even though it is not empty
    same = tmp_path / "sub" / ".."
    (tmp_path / "sub").mkdir()
    assert setup_mod._check_out(str(same), str(tmp_path), tmp_path / "m.py", False) == tmp_path


def test_without_out_a_new_stamped_folder_under_runs(tmp_path, monkeypatch):
    class Frozen:
        @staticmethod
        def now():
            return datetime(2024, 5, 6, 7, 8, 9)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup_mod, "datetime", Frozen)
    model = tmp_path / "models" / "my_gpt.py"
    first = setup_mod._check_out(None, None, model, False)
    assert first.parts[-1] == "my_gpt-20240506-070809" and not first.exists()
    assert setup_mod._check_out(None, None, model, True).parts[-1] == "my_gpt-dense-20240506-070809"
    first.mkdir(parents=True)
    assert setup_mod._check_out(None, None, model, False) == first.with_name("my_gpt-20240506-070809-1")
    first.with_name("my_gpt-20240506-070809-1").mkdir()
    assert setup_mod._check_out(None, None, model, False) == first.with_name("my_gpt-20240506-070809-2")


# ---- what setup builds -------------------------------------------------------------------------------

def test_model_is_the_files_model_under_the_seed(built):
    _, mf, run = built
    torch.manual_seed(7)
    want = mf.model()
    got = run.model.state_dict()
    assert set(got) == set(want.state_dict())
    for name, t in want.state_dict().items():
        torch.testing.assert_close(got[name], t, atol=0, rtol=0, msg=name)
    torch.manual_seed(8)  # another seed: other weights
    assert not torch.equal(mf.model().state_dict()["lm_head.weight"], got["lm_head.weight"])


def test_adamw_decays_matrices_only(built):
    _, _, run = built
    opt = run.opt
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    decay, rest = opt.param_groups
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"]} == {id(p) for p in trainable if p.ndim >= 2}
    assert {id(p) for p in rest["params"]} == {id(p) for p in trainable if p.ndim < 2}
    assert len(decay["params"]) + len(rest["params"]) == len(trainable)  # each parameter once (tied ones too)
    assert rest["params"], "the tiny GPT has biases / norm weights: the group without decay is not empty"
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    for g in opt.param_groups:
        assert g["lr"] == 2e-3 and g["betas"] == (0.8, 0.9)


def test_the_new_folder_and_the_run_state(built):
    d, mf, run = built
    assert run.run_dir == d / "run" and run.net is run.acct.module
    assert (run.start, run.best, run.elapsed0) == (0, math.inf, 0.0)
    assert run.step_tokens == run.tc.batch_size * run.tc.block_size * run.tc.grad_accum == 4 * 32
    config = tomllib.loads((d / "run" / "config.toml").read_text())
    assert config["model"] == str(mf.path.resolve())  # absolute: resume and export work from any folder
    assert config["model_sha256"] == hashlib.sha256(mf.path.read_bytes()).hexdigest()
    assert (d / "run" / "metrics.jsonl").exists()


def test_two_setups_of_one_seed_draw_the_same(built, tmp_path):
    _, mf, run = built
    again = _setup(mf, run.tc, run.mst, out=tmp_path / "again")
    again.log.close()
    for (n, a), b in zip(run.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    B, T = run.tc.batch_size, run.tc.block_size
    x, y = run.data.batch("train", (0, 0, 0), B, T, 7)
    x2, y2 = again.data.batch("train", (0, 0, 0), B, T, 7)
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (B, T)
    torch.testing.assert_close(y[:, :-1], x[:, 1:], atol=0, rtol=0)  # next-token targets


def test_block_size_beyond_the_model_is_refused_before_the_folder_is_made(built, tmp_path):
    _, mf, run = built
    with pytest.raises(MstCompileError) as e:
        _setup(mf, dataclasses.replace(run.tc, block_size=64), run.mst, out=tmp_path / "r")
    assert _one_line(e) == ("block size 64 is larger than the model's maximum sequence length 32; "
                            "use --block-size 32 or less")
    assert not (tmp_path / "r").exists()


# ---- resume ------------------------------------------------------------------------------------------

def test_resume_restores_weights_position_and_elapsed_time(built, tmp_path, monkeypatch):
    d, mf, run = built
    folder = shutil.copytree(d / "run", tmp_path / "run")
    run.run_dir = folder
    saved = {k: v.clone() for k, v in run.model.state_dict().items()}
    try:
        with torch.no_grad():
            run.model.lm_head.weight.add_(1.0)  # weights no fresh seeded model has
        run.elapsed0, run.best, run.t_start = 100.0, 2.5, time.time() - 20.0  # 20 s into this process
        _checkpoint(run, 5)
        marked = run.model.lm_head.weight.detach().clone()
    finally:
        run.model.load_state_dict(saved)
        run.run_dir, run.elapsed0, run.best = d / "run", 0.0, math.inf

    back = _setup(mf, run.tc, run.mst, out=folder, resume=str(folder), t_start=1000.0)
    back.log.close()
    assert (back.start, back.best) == (5, 2.5)
    assert 120.0 <= back.elapsed0 < 150.0  # 100 s before, 20 s in the process that saved it
    torch.testing.assert_close(back.model.lm_head.weight.detach(), marked, atol=0, rtol=0)
    monkeypatch.setattr(setup_mod.time, "time", lambda: 1003.0)  # 3 s after this process started
    assert back.elapsed() == back.elapsed0 + 3.0
    monkeypatch.undo()

    # a model file changed since: a warning, the checkpoint still loads
    mf.path.write_text(mf.path.read_text() + "\n# edited\n")
    try:
        with pytest.warns(UserWarning, match=r"the model file .* changed since the run in"):
            _setup(mf, run.tc, run.mst, resume=folder).log.close()
    finally:
        mf.path.write_text(TINY)
    # a run whose steps are all done
    _checkpoint(back, 24)
    with pytest.raises(MstCompileError) as e:
        _setup(mf, run.tc, run.mst, resume=folder)
    assert _one_line(e) == (f"--resume {folder}: the run already finished its 24 steps (see its summary.json); "
                            "pass a larger --steps to train longer in the final phase")
