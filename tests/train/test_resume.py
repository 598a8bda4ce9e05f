"""Resumes that can change course (repeat the original flags, lower --lr, longer --steps; refuse the
rest naming each) and run folders that work from any folder."""
import json
import shutil

import pytest
import tomllib
import torch
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.run_folder import load_run_config
from mst_compile.train.loop import TrainingInterrupted, lr_at, train
from mst_compile.train.metrics import read_jsonl


def _rows(run, kind):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, module_env):
    """The whole 24-step run and a copy interrupted after step 11."""
    d = tmp_path_factory.mktemp("resume")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    f = write(d, "tiny.py", TINY)
    train(f, out=d / "whole", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(f, out=d / "split", progress=False, stop_at=11)
    return d, f


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _config(run):
    return tomllib.loads((run / "config.toml").read_text())


def test_repeating_the_original_flags_resumes_exactly(runs, tmp_path):
    d, f = runs
    run = _copy(d / "split", tmp_path / "run")
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--steps", "24", "--batch-size", "4",
                                  "--lr", "0.003", "--stride", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    for kind in ("train", "eval", "update"):
        assert _rows(run, kind) == _rows(d / "whole", kind), kind


def test_changes_that_change_the_run_are_refused_naming_each(runs, tmp_path):
    d, f = runs
    run = _copy(d / "split", tmp_path / "run")
    before = (run / "checkpoints/last.pt").read_bytes()
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--batch-size", "8", "--sparsity", "0.5",
                                  "--seed", "3", "--lr", "0.001"])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    for part in ("--batch-size 8 (the run has 4)", "--sparsity 0.5 (the run has ", "--seed 3 (the run has 0)"):
        assert part in r.output
    assert "--lr" not in r.output.split("may change only")[0], "an allowed change is not listed as a conflict"
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--steps", "20"])
    assert r.exit_code == 2 and "--steps 20 is shorter than the run's 24 steps" in r.output
    assert (run / "checkpoints/last.pt").read_bytes() == before


def test_lower_lr_after_an_interruption(runs, tmp_path):
    d, f = runs
    run = _copy(d / "split", tmp_path / "run")
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--lr", "0.001", "--quiet"])
    assert r.exit_code == 0, r.output
    t = _config(run)["train"]
    assert t["lr"] == 0.001 and t["min_lr"] == pytest.approx(0.0001)  # min_lr scaled with lr (3e-4 before)
    tc, mst = load_run_config(run)
    rows, whole = _rows(run, "train"), _rows(d / "whole", "train")
    assert rows[:11] == whole[:11]
    for row in rows[11:]:  # the curve times (1/density)^p at the density the step trains at
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, tc, mst) * row["density"] ** -mst.lr_density_power)
    assert rows[11]["lr"] < whole[11]["lr"]


def test_longer_steps_continue_in_the_final_phase(runs, tmp_path):
    d, f = runs
    run = _copy(d / "whole", tmp_path / "run")
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--steps", "30", "--quiet"])
    assert r.exit_code == 0, r.output
    t = _config(run)["train"]
    assert t["steps"] == 30 and t["schedule_steps"] == 24
    rows, whole = _rows(run, "train"), _rows(d / "whole", "train")
    assert rows[:24] == whole
    final = whole[-1]
    assert len({row["density"] for row in rows[24:]}) == 1, "the final masks are held"
    for row in rows[24:]:
        assert row["phase"] == "restoration" and row["attention"] == final["attention"]
        assert row["lr"] == pytest.approx(t["min_lr"] * final["density"] ** -_config(run)["mst"]["lr_density_power"])
    assert max(u["step"] for u in _rows(run, "update")) <= 24, "no topology update past the schedule"
    assert json.loads((run / "summary.json").read_text())["steps"] == 30


def test_run_folder_is_relocatable_and_a_changed_model_file_is_named(runs, tmp_path, monkeypatch):
    d, _ = runs
    work = tmp_path / "work"
    work.mkdir()
    write(work, "tiny.py", TINY)
    monkeypatch.chdir(work)
    with pytest.raises(TrainingInterrupted):
        train("tiny.py", out="run", progress=False, stop_at=11)  # relative paths
    cfg = _config(work / "run")
    assert cfg["model"] == str(work / "tiny.py") and len(cfg["model_sha256"]) == 64
    moved = tmp_path / "elsewhere"
    shutil.move(str(work / "run"), moved)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["train", str(work / "tiny.py"), "--resume", str(moved), "--quiet"])
    assert r.exit_code == 0, r.output
    assert _rows(moved, "train") == _rows(d / "whole", "train")
    with open(work / "tiny.py", "a") as fh:
        fh.write("\n# edited after training\n")
    from mst_compile.export.run import load_run

    with pytest.warns(UserWarning, match=r"the model file .*tiny.py changed since the run in .*elsewhere was trained"):
        _, model, sm, _, _ = load_run(moved)
    assert sm.mst.step_count == 24
    ck = torch.load(moved / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())


def _old_spelling(run) -> None:
    """Rewrite the run's config.toml as mstc wrote it before the recipe/ablation split."""
    doc = _config(run)
    ablation = doc["mst"].pop("ablation")
    mst = {**doc["mst"], **ablation, "total_steps": doc["train"]["steps"], "seed": doc["train"]["seed"]}
    mst["drop_fraction"] = mst["drop_fraction"][0]  # one number: (ζ, ζ, 0), the default's shape

    def value(v):
        return json.dumps(v) if isinstance(v, (str, list)) else str(v).lower() if isinstance(v, bool) else repr(v)

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for table, body in (("train", doc["train"]), ("mst", mst)):
        lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in body.items()]
    (run / "config.toml").write_text("\n".join(lines) + "\n")


def test_a_run_folder_written_in_the_old_spelling_resumes_exactly(runs, tmp_path):
    d, f = runs
    run = _copy(d / "split", tmp_path / "run")
    _old_spelling(run)
    assert "total_steps = 24" in (run / "config.toml").read_text() and "[mst.ablation]" not in (run / "config.toml").read_text()
    assert load_run_config(run) == load_run_config(d / "split")  # the same recipe, read in today's keys
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(run), "--quiet"])
    assert r.exit_code == 0, r.output
    for kind in ("train", "eval", "update"):
        assert _rows(run, kind) == _rows(d / "whole", kind), kind


def test_a_checkpoint_with_the_old_scalar_drop_fraction_loads_without_a_config_warning():
    import warnings

    from _models import tiny_gpt

    import mst_compile

    sm = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(), total_steps=20)
    sd = sm.mst.state_dict()
    old = {**sd, "config": {**sd["config"], "drop_fraction": 0.3}}  # how checkpoints stored the default ζ before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm.mst.load_state_dict(old)
    with pytest.warns(UserWarning, match=r"different MSTConfig \(drop_fraction"):  # a ζ that differs is still named
        sm.mst.load_state_dict({**sd, "config": {**sd["config"], "drop_fraction": 0.2}})
