"""run_folder.py: where each file of a run folder lives, and the one-line refusals of a folder that is not
a run, or a run with no checkpoint (with the command that starts it again)."""
import shlex

import pytest

from mst_compile import run_folder
from mst_compile.errors import MstCompileError


def test_the_layout(tmp_path):
    assert run_folder.config_file(tmp_path) == tmp_path / "config.toml"
    assert run_folder.checkpoints(str(tmp_path)) == tmp_path / "checkpoints"
    assert run_folder.last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.pt"


def test_existing_accepts_a_run_with_a_checkpoint_and_names_what_is_missing(tmp_path):
    with pytest.raises(MstCompileError, match="does not exist"):
        run_folder.existing(tmp_path / "nope")
    with pytest.raises(MstCompileError, match=r"is not a run folder \(no config.toml\)"):
        run_folder.existing(tmp_path)
    (tmp_path / "config.toml").write_text('model = "my model.py"\n')
    with pytest.raises(MstCompileError, match="stopped before its first checkpoint") as e:
        run_folder.existing(tmp_path)
    cfg = shlex.quote(str(tmp_path / "config.toml"))
    assert str(e.value).endswith(f"mstc train 'my model.py' --config {cfg} --out NEW_RUN_DIR")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert run_folder.existing(str(tmp_path)) == tmp_path


def test_a_broken_config_still_gets_restart_advice(tmp_path):
    (tmp_path / "config.toml").write_text("model = [unclosed\n")
    with pytest.raises(MstCompileError, match=r"mstc train MODEL --config "):
        run_folder.existing(tmp_path)


def test_load_run_config_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(MstCompileError, match=r"--resume .*: not a run folder \(no config.toml\)"):
        run_folder.load_run_config(tmp_path)
