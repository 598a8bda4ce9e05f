"""mstc report: PNG plots and a markdown table for an MST run and its dense baseline."""
import json

import pytest
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_env):
    d = tmp_path_factory.mktemp("report")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    f = write(d, "tiny.py", TINY)
    runner = CliRunner()
    for name, extra in (("mst", []), ("dense", ["--dense"])):
        r = runner.invoke(main, ["train", str(f), "--steps", "16", "--update-interval", "2", "--quiet", "--out", str(d / name), *extra])
        assert r.exit_code == 0, r.output
    return d


def test_report_writes_plots_and_markdown(runs):
    import matplotlib.image as mpimg

    r = CliRunner().invoke(main, ["report", str(runs / "mst"), str(runs / "dense"), "--out", str(runs / "rep")])
    assert r.exit_code == 0, r.output
    for name in ("loss", "sparsity", "attention", "layer_density"):
        png = runs / "rep" / f"{name}.png"
        img = mpimg.imread(png)
        assert png.stat().st_size > 5000 and img.shape[0] > 200 and img.shape[1] > 400, name
        assert img[..., :3].std() > 0.05, name  # not a blank canvas
    md = (runs / "rep" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| mst |") or line.startswith("| dense |")]
    assert len(rows) == 2 and "| MST |" in rows[0] and "| dense |" in rows[1] and "1.00x" in rows[1]
    head = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "FLOPs (alg.)" in head and "alg. reduction" in head and "s/step (measured)" in head
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    cols = [c.strip() for c in head.strip("|").split("|")]
    step = {n: json.loads((runs / n / "summary.json").read_text())["step_s"] for n in ("mst", "dense")}
    assert all(v > 0 for v in step.values())
    assert {c[0]: float(c[cols.index("s/step (measured)")]) for c in cells} == {n: float(f"{v:.3g}") for n, v in step.items()}
    speed = {c[0]: c[cols.index("measured speed-up")] for c in cells}
    assert speed["dense"] == "1.00x" and speed["mst"] == f"{step['dense'] / step['mst']:.2f}x"
    assert "algorithmic counts" in md and "dense run dense" in md
    assert all(f"]({n}.png)" in md for n in ("loss", "sparsity", "attention", "layer_density"))


def test_report_default_folder_and_bad_input(runs, tmp_path):
    r = CliRunner().invoke(main, ["report", str(runs / "mst")])
    assert r.exit_code == 0, r.output
    assert (runs / "mst" / "report" / "loss.png").stat().st_size > 0
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a run folder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output
