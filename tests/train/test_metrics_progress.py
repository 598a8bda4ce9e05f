"""The progress display: a tqdm bar on a terminal, plain log lines otherwise, nothing when quiet."""
import io
import sys

from mst_compile.train.metrics import Progress, human

FIELDS = {"phase": "ultra", "loss": 2.34567, "density": 0.1, "reduction": 3.5}


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal(monkeypatch):
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(total=20, start=0, every=5)
    assert p.bar is not None
    for step in range(1, 21):
        p.update(step, FIELDS)
    p.note("step 20: val loss 2.0")
    p.close()
    out = err.getvalue()
    assert "20/20" in out and "ultra loss 2.3457 density 0.100 alg. FLOPs /3.50" in out and "step 20: val loss 2.0" in out


def test_plain_lines_when_not_a_terminal(capsys):
    p = Progress(total=20, start=10, every=5)
    assert p.bar is None
    for step in range(11, 21):
        p.update(step, FIELDS)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["15/20", "20/20"]
    assert all("eta" in line and "ultra loss 2.3457" in line for line in lines)


def test_quiet_prints_nothing(capsys):
    p = Progress(total=5, start=0, every=1, enabled=False)
    for step in range(1, 6):
        p.update(step, FIELDS)
    p.note("x")
    assert capsys.readouterr().err == ""


def test_human_units():
    assert human(1.5e12) == "1.5T" and human(2.0e9) == "2G" and human(999) == "999"
