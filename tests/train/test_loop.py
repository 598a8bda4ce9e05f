"""mstc train end to end on tiny models: artefacts, the dense baseline, resume, Ctrl-C, NaN, bad input."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_models import NAN_AT_6, SLOW, TINY, UNCAPTURABLE, WIDER, write
from click.testing import CliRunner

from mst_compile.cli import main
from mst_compile.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def work(tmp_path_factory, module_env):
    """One MST run and one dense run of the tiny model, shared by the tests that only read them."""
    d = tmp_path_factory.mktemp("train")
    module_env.setenv("MST_COMPILE_CACHE", str(d / "cache"))
    write(d, "tiny.py", TINY)
    runner = CliRunner()
    mst = runner.invoke(main, ["train", str(d / "tiny.py"), "--out", str(d / "mst")])
    dense = runner.invoke(main, ["train", str(d / "tiny.py"), "--dense", "--out", str(d / "dense")])
    return d, mst, dense


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_mst_run_writes_every_artefact(work):
    d, r, _ = work
    assert r.exit_code == 0, r.output
    run = d / "mst"
    for f in ("config.toml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("done: 24 steps (mst)") and str(run) in line and "reduction" in line
    train = _records(run, "train")
    assert [t["step"] for t in train] == list(range(1, 25))
    assert {t["phase"] for t in train} == {"warmup", "ultra", "restoration"}
    for t in train:
        assert math.isfinite(t["loss"]) and 0 < t["density"] <= 1 and t["tokens_per_s"] > 0
        assert t["mst_flops"] <= t["dense_flops"]
    assert min(t["density"] for t in train) < 0.2  # ultra phase at sparsity 0.9
    assert all(list(t["attention"].values()) == ["sparse", "dense"] for t in train if t["phase"] == "ultra")  # depth 0.5
    assert {p for t in train if t["phase"] == "warmup" for p in t["attention"].values()} == {"dense"}
    assert [e["step"] for e in _records(run, "eval")] == [8, 16, 24]
    assert len(_records(run, "update")) >= 4  # every 4 steps
    s = json.loads((run / "summary.json").read_text())
    assert s["reduction"] == pytest.approx(s["dense_flops"] / s["mst_flops"]) and s["reduction"] > 1.2
    assert s["tokens"] == 24 * 4 * 32
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 24 and set(ck) >= {"model", "optimizer", "mst", "rng", "data"}


def test_dense_baseline_counts_what_the_mst_ledger_calls_dense(work):
    d, mst, dense = work
    assert dense.exit_code == 0, dense.output
    a = json.loads((d / "mst" / "summary.json").read_text())
    b = json.loads((d / "dense" / "summary.json").read_text())
    assert b["mode"] == "dense" and b["mst_flops"] == b["dense_flops"] and b["reduction"] == 1.0
    assert b["dense_flops"] == pytest.approx(a["dense_flops"], rel=1e-9)  # same tokens, same formula at d = 1
    assert {t["density"] for t in _records(d / "dense", "train")} == {1.0}


def test_resume_continues_exactly(work, tmp_path):
    d, _, _ = work
    from mst_compile.train.loop import TrainingInterrupted, train

    with pytest.raises(TrainingInterrupted, match="interrupted after step 11"):
        train(d / "tiny.py", out=tmp_path / "split", progress=False, stop_at=11)  # step 12 is a topology update
    assert json.loads(json.dumps(torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=True)["step"])) == 11
    r = CliRunner().invoke(main, ["train", str(d / "tiny.py"), "--resume", str(tmp_path / "split")])
    assert r.exit_code == 0, r.output
    whole, split = d / "mst", tmp_path / "split"
    for kind in ("train", "eval", "update"):
        strip = lambda rows: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in rows]
        assert strip(_records(split, kind)) == strip(_records(whole, kind)), kind
    a = torch.load(whole / "checkpoints/last.pt", weights_only=True)
    b = torch.load(split / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_matches(tmp_path):
    from mst_compile.train.loop import train

    f = write(tmp_path, "slow.py", SLOW)
    train(f, out=tmp_path / "whole", progress=False)
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mst_compile", "train", str(f), "--out", str(out), "--quiet"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(read_jsonl(out / "metrics.jsonl")) < 5 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted after step" in stderr and "--resume" in stderr
    step = torch.load(out / "checkpoints/last.pt", weights_only=True)["step"]
    assert 5 <= step < 24
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == step
    r = CliRunner().invoke(main, ["train", str(f), "--resume", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    strip = lambda rows: [{k: v for k, v in x.items() if k != "tokens_per_s"} for x in rows]
    for kind in ("train", "eval", "update"):
        assert strip(_records(out, kind)) == strip(_records(tmp_path / "whole", kind)), kind


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    f = write(tmp_path, "nan.py", NAN_AT_6)
    out = tmp_path / "nan"
    r = CliRunner().invoke(main, ["train", str(f), "--out", str(out), "--checkpoint-interval", "4", "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "loss became nan at step 5" in r.output and str(out / "checkpoints" / "last.pt") in r.output
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_data_folder(work, tmp_path):
    d, _, _ = work
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i}.md").write_text(f"# note {i}\n" + "the quick brown fox jumps over the lazy dog. " * 30)
    r = CliRunner().invoke(main, ["train", str(d / "tiny.py"), "--data", str(docs), "--steps", "6", "--update-interval", "1",
                                  "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert 'data = ' in (tmp_path / "run/config.toml").read_text() and str(docs) in (tmp_path / "run/config.toml").read_text()
    meta = [json.loads(m.read_text()) for m in (d / "cache").glob("docs-*/meta.json")]
    # every byte of every file, plus the newline that ends a file lacking one
    assert meta and meta[0]["source"] == str(docs) and meta[0]["train_tokens"] + meta[0]["val_tokens"] == sum(
        len((docs / f"doc{i}.md").read_bytes()) + 1 for i in range(12))


def test_data_hook_of_the_model_file(tmp_path):
    f = write(tmp_path, "hooked.py", TINY + "\nimport torch\ndef data():\n    return torch.arange(5000) % 7\n")
    r = CliRunner().invoke(main, ["train", str(f), "--steps", "24", "--lr", "0.01", "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "run/summary.json").read_text())
    assert s["val_loss"] < 4.0  # only 7 distinct tokens: well below ln(256) = 5.5 of random bytes


def _one_line_error(r, code=2):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def test_bad_input_is_one_line_and_keeps_the_disk(work, tmp_path):
    d, _, _ = work
    run = CliRunner()
    assert "does not exist" in _one_line_error(run.invoke(main, ["train", str(tmp_path / "none.py")]))
    write(tmp_path, "nomodel.py", "x = 1\n")
    assert "does not define model()" in _one_line_error(run.invoke(main, ["train", str(tmp_path / "nomodel.py")]))
    write(tmp_path, "unc.py", UNCAPTURABLE)
    assert "cannot capture M" in _one_line_error(run.invoke(main, ["train", str(tmp_path / "unc.py"), "--out", str(tmp_path / "u")]))
    assert not (tmp_path / "u").exists()
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--data", str(tmp_path / "empty.txt")]))
    (tmp_path / "small.txt").write_text("y" * 300)
    msg = _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--data", str(tmp_path / "small.txt"), "--block-size", "31", "--val-fraction", "0.1"]))
    assert "block size 31 is larger than the data" in msg
    msg = _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--block-size", "64"]))
    assert "larger than the model's maximum sequence length 32" in msg
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlearning_rate = 1\n")
    assert "unknown key(s) ['learning_rate']" in _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--config", str(toml)]))
    # an existing --out is left exactly as it was
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert "already exists" in _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--out", str(keep)]))
    assert _tree(keep) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    # a checkpoint of another model: refused, the run folder untouched
    before = _tree(d / "mst")
    write(tmp_path, "wider.py", WIDER)
    msg = _one_line_error(run.invoke(main, ["train", str(tmp_path / "wider.py"), "--resume", str(d / "mst")]))
    assert "different model" in msg and "shapes differ" in msg
    assert _tree(d / "mst") == before
    msg = _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--resume", str(d / "mst"), "--batch-size", "8"]))
    assert "--batch-size 8 (the run has 4)" in msg
    assert "already finished its 24 steps" in _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--resume", str(d / "mst")]))
    assert _tree(d / "mst") == before
    assert "not a run folder" in _one_line_error(run.invoke(main, ["train", str(d / "tiny.py"), "--resume", str(tmp_path)]))


def test_help_lists_every_config_field():
    import dataclasses

    from mst_compile import Ablation, MSTConfig
    from mst_compile.train.options import TrainConfig

    r = CliRunner().invoke(main, ["train", "--help"])
    flags = set(r.output.replace(",", " ").split())
    for f in [*dataclasses.fields(TrainConfig), *dataclasses.fields(MSTConfig), *dataclasses.fields(Ablation)]:
        if f.name not in ("dense", "ablation"):  # --dense: the command's own switch; the group: one flag per field
            assert f"--{f.name.replace('_', '-')}" in flags, f.name
    assert "--total-steps" in flags and "--config" in flags and "--resume" in flags


def test_final_densities_are_what_the_last_step_trained(work):
    d, r, _ = work
    assert r.exit_code == 0, r.output
    run = d / "mst"
    assert [u["step"] for u in _records(run, "update")] == [4, 8, 12, 16, 20], "no update after the last step (24)"
    trained = _records(run, "train")[-1]  # logged at step 24 with the density that step trained at
    masks = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["mst"]["mst"]["masks"]
    s = json.loads((run / "summary.json").read_text())
    assert set(s["final_densities"]) == set(masks)
    for n, m in masks.items():
        assert s["final_densities"][n] == pytest.approx(int(m.sum()) / m.numel(), rel=1e-12), n
    overall = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert overall == pytest.approx(trained["density"], rel=1e-12)
    assert trained["density"] == pytest.approx(0.5, abs=0.01), "the last update (step 20) lands s_end = 0.5"


def test_summary_line_calls_the_count_algorithmic_and_shows_measured_time(work):
    d, r, dense = work
    for res, run in ((r, d / "mst"), (dense, d / "dense")):
        line = res.output.strip().splitlines()[-1]
        s = json.loads((run / "summary.json").read_text())
        assert s["step_s"] > 0 and s["step_s"] * s["steps"] <= s["wall_s"]
        assert "algorithmic FLOPs: MST" in line and f"{s['step_s']:.3g} s/step" in line
