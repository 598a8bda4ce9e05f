"""What mstc says about itself: every default in --help, and bad flag values named as they were typed."""
import click
import pytest
from _train_models import TINY, write
from click.testing import CliRunner

from mst_compile.cli import main

COMMANDS = sorted(main.commands)


def _help_records(name):
    cmd = main.commands[name]
    ctx = click.Context(cmd, info_name=name, parent=click.Context(main, info_name="mstc", show_default=True))
    return {p.opts[0]: p.get_help_record(ctx)[1] for p in cmd.params
            if isinstance(p, click.Option) and not p.is_flag and not p.required and p.name != "help"}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default(name):
    records = _help_records(name)
    assert records, name
    missing = [opt for opt, text in records.items() if "[default:" not in text]
    assert not missing, f"mstc {name} --help shows no default for {missing}"


def test_train_help_shows_the_built_in_defaults():
    r = CliRunner().invoke(main, ["train", "--help"], terminal_width=400)
    assert r.exit_code == 0
    lines = {line.split()[0].rstrip(","): line for line in r.output.splitlines() if line.strip().startswith("--")}
    for flag, shown in [("--steps", "[default: 1000]"), ("--batch-size", "[default: 16]"), ("--lr", "[default: 0.001]"),
                        ("--sparsity", "[default: 0.85]"), ("--block-size", "[default: (the model's block_size, else 128)]"),
                        ("--attention-phases", "[default: warmup,ultra,restoration]"), ("--out", "[default: (runs/<name>-<timestamp>)]")]:
        assert shown in lines[flag], (flag, lines[flag])


def test_plan_help_describes_the_batch_size_once():
    r = CliRunner().invoke(main, ["plan", "--help"], terminal_width=400)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "per process" not in text and text.count("micro-batch") == 1
    assert "--batch-size INTEGER Sequences per micro-batch, all devices together" in text
    assert "--hardware TEXT" in text and "[default: local]" in text


@pytest.mark.parametrize("args, line", [
    (["--steps", "0"], "--steps 0 is invalid: expected an integer >= 1"),
    (["--lr", "-1"], "--lr -1 is invalid: expected a number > 0"),
    (["--batch-size", "0"], "--batch-size 0 is invalid: expected an integer >= 1"),
    (["--sparsity", "1.5"], "--sparsity 1.5 is invalid: expected a number in [0, 1)"),
    (["--drop-fraction", "2,0.3,0"], "--drop-fraction 2,0.3,0 is invalid"),
    (["--device", "tpu"], "--device tpu is invalid: expected auto, cpu, cuda or cuda:N"),
    # a schedule check: mstc plan makes it before any capture (mstc train after loading its data)
    (["--tokens", "3072", "--update-interval", "400"], "--update-interval 400: the warmup phase [0, 6) of 24 steps contains no topology update"),
])
def test_errors_name_the_flags_as_typed(tmp_path, args, line):
    f = write(tmp_path, "tiny.py", TINY)  # 4 x 32 tokens a step
    command = ["plan", str(f), "--hardware", "h100"] if "--tokens" in args else ["train", str(f), "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(main, [*command, *args])
    assert r.exit_code == 2, r.output
    (only,) = r.output.strip().splitlines()
    assert only.startswith(f"Error: {line}") and "TrainConfig" not in only and "MSTConfig" not in only, r.output


def test_the_python_api_names_the_fields():
    from mst_compile import MSTConfig
    from mst_compile.train.options import TrainConfig

    with pytest.raises(ValueError, match=r"^TrainConfig.steps=0 is invalid"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"^MSTConfig.sparsity=1.5 is invalid"):
        MSTConfig(sparsity=1.5)
