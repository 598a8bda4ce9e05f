"""paths.py: output paths are probed before any work, one line says why one cannot be written, and a
probe leaves nothing behind."""
import os
import re
from pathlib import Path

import pytest

from mst_compile.errors import MstCompileError
from mst_compile.paths import writable_dir, writable_file


def test_new_paths_in_writable_folders_pass_and_nothing_is_created(tmp_path):
    assert writable_file(tmp_path / "a" / "b" / "out.onnx", "--out") == tmp_path / "a" / "b" / "out.onnx"
    assert writable_dir(tmp_path / "runs" / "new", "--out") == tmp_path / "runs" / "new"
    existing = tmp_path / "old.onnx"
    existing.write_text("x")
    assert writable_file(str(existing), "--out") == existing and existing.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["old.onnx"]  # no folder made, no probe left


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_named(tmp_path):
    with pytest.raises(MstCompileError, match=rf"^--out {re.escape(str(tmp_path))} is a folder: pass a file name inside it$"):
        writable_file(tmp_path, "--out")
    f = tmp_path / "f.txt"
    f.write_text("")
    with pytest.raises(MstCompileError, match=r"is a file, not a folder; choose another path$"):
        writable_dir(f, "--out")
    with pytest.raises(MstCompileError, match=rf"cannot be written \({f} is not a folder\)"):
        writable_file(f / "sub" / "x.onnx", "--out")  # under a file: the nearest existing ancestor is no folder


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, which no one can write (root included)")
def test_an_unwritable_file_system_is_found_by_the_probe():
    with pytest.raises(MstCompileError, match=r"^--out /proc/mstc-run cannot be written \(cannot create files in /proc: .+\); "
                                              r"choose another path$"):
        writable_dir("/proc/mstc-run", "--out")
