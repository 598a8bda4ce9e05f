"""``mstc``: a thin command line over the Python API. Importing this module does not import torch."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from .constants import ATTENTION_PATTERNS, BLOCKS_META, WHOLE_META
from .errors import ModelInputError, MstCompileError


class _Failure(click.ClickException):
    """One readable line on stderr and exit status 2, like click's own usage errors."""

    exit_code = 2


def _friendly(fn):
    """Turn mst_compile's own errors (and bad values) into one readable line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MstCompileError, ValueError, TypeError) as e:
            from .train.options import in_flag_terms

            raise _Failure(in_flag_terms(str(e), _given_flags())) from None

    return wrapper


def _given_flags() -> dict:
    """The TrainConfig / MSTConfig flags given on this command line, by field name, as click parsed them."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    return {key.rsplit("__", 1)[1]: value for key, value in ctx.params.items()
            if key.startswith(("train__", "mst__")) and ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE
            and not isinstance(value, tuple)}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mst-compile")
def main() -> None:
    """mst_compile: Mixed Sparsity Training for PyTorch transformers."""


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--sparsity", type=float, default=None, show_default="the model file's config(), else 0.85",
              help="Ultra-phase sparsity to show densities for.")
@_friendly
def inspect(model_file: str, sparsity: float | None) -> None:
    """Show which sites of MODEL_FILE's model() MST rewrites, with densities and FLOP shares.

    The model is captured as mstc train captures it: with the file's example_inputs(), else a batch of
    token ids at the run's batch and block size, passed as its batch(tokens) or the trainer would.
    """
    from .modelfile import load_model_file

    mf = load_model_file(model_file)
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise click.BadParameter(f"{sparsity} is not in [0, 1)", param_hint="--sparsity")
    import torch

    from .api import sparsify
    from .errors import CaptureError
    from .modelfile import max_sequence_length
    from .runtime.handle import linear_flop_shares
    from .train.options import configs_for_model_file

    tc, cfg = configs_for_model_file(mf, None, {}, {})  # the hooks, as mstc train reads them
    model = mf.model()
    tc = tc.resolved(cfg, max_sequence_length(model))
    tokens = torch.zeros(tc.batch_size, tc.block_size, dtype=torch.long)  # what train captures with: a batch of ids
    try:
        sm = sparsify(model, cfg, example_inputs=mf.capture_inputs(model, tokens))
    except CaptureError as e:
        raise mf.capture_error(e) from None
    s = cfg.sparsity if sparsity is None else sparsity
    sites, order = sm.mst.sites, list(sm.mst.attention_modules())  # order: what MSTConfig.attention_depth counts
    alloc, units = sm.mst.allocation(s), sm.mst.units()  # tile counts under MSTConfig.tile
    shares = linear_flop_shares(sites)
    rows = [("site", "kind", "shape", "params", f"density@{s:g}", "linear FLOPs")]
    for e in sites:
        if e.kind == "linear":
            rows.append((e.name, e.kind, "x".join(map(str, e.shape)), f"{e.params:,}", f"{alloc[e.name] / units[e.name]:.3f}", f"{shares[e.name]:.1%}"))
        else:
            rows.append((e.name, e.kind, "-", "-", cfg.attention_pattern(e.name, "ultra", order), "-"))
    total = sum(e.params for e in sites if e.kind == "linear")
    active = sum(alloc[e.name] / units[e.name] * e.params for e in sites if e.kind == "linear")
    rows.append(("total", f"{len(sites)} sites", "", f"{total:,}", f"{active / max(total, 1):.3f}", "100.0%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0 or i == len(rows) - 2:
            click.echo("  ".join("-" * w for w in widths))
    if cfg.tile:
        click.echo(f"masks: constant on {cfg.tile}x{cfg.tile} tiles (densities are tile densities)")
    path = sm.meta.get(BLOCKS_META)
    form = f"per block ({path}, {len(sm.get_submodule(path))} blocks)" if path else f"whole ({sm.meta.get(WHOLE_META)})"
    click.echo(f"captured with {sm.mst.capture}, {form}; skipped: {len(sm.mst.skipped)}")
    for site, why in sm.mst.skipped:
        click.echo(f"  skipped {site}: {why}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("dest", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf"]), default="onnx", show_default=True,
              help="onnx: one ONNX file checked in onnxruntime; hf: a Hugging Face folder (safetensors + config).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, show_default="RUN_DIR/model.onnx", help="ONNX file to write.")
@click.option("--attention", type=click.Choice(ATTENTION_PATTERNS), default=None,
              show_default="the pattern active at the end of training", help="Attention pattern to export.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", help="onnxruntime provider of the validation run.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Largest |onnxruntime - PyTorch| difference allowed.")
@click.option("--no-validate", is_flag=True, help="Write the file without the onnxruntime check.")
@click.option("--dense-initializers", is_flag=True, help="Store every weight dense (no COO sparse initializers).")
@click.option("--check-lengths", default=None, metavar="L1,L2,...", show_default="the example's length only",
              help="Also validate at these sequence lengths (each at most the model's maximum sequence length).")
@_friendly
def export(run_dir: str, dest: str | None, fmt: str, output: str | None, attention: str | None, provider: str, atol: float,
           no_validate: bool, dense_initializers: bool, check_lengths: str | None) -> None:
    """Export RUN_DIR's last checkpoint: to ONNX (checked against PyTorch in onnxruntime) or, with
    --format hf, to the Hugging Face folder DEST (default RUN_DIR/hf)."""
    from . import run_folder as rf
    from .paths import writable_dir, writable_file

    if dest and output and dest != output:
        raise click.BadParameter(f"give the destination once: {dest} or -o {output}", param_hint="DEST")
    run = rf.existing(run_dir)  # a typo fails in well under a second: checked before torch is imported
    if fmt == "hf":
        if attention is not None:
            raise click.BadParameter("a Hugging Face folder keeps the attention the model trained with (config.json "
                                     "records it)", param_hint="--attention")
        writable_dir(Path(dest or output or run / "hf"), "DEST")
        from .export.hf import export_run_hf, read_summary

        folder = export_run_hf(run_dir, dest or output)
        s = read_summary(folder)
        click.echo(f"wrote {folder}: density {s['density']:.3f}, masks folded in, attention at the end of training "
                   f"{s['attention_at_end']}" + (f" ({s['attention_note']})" if "attention_note" in s else ""))
        return
    writable_file(dest or output or run / rf.ONNX, "--output")
    lengths = _lengths(check_lengths) if check_lengths is not None else []
    if lengths and no_validate:
        raise click.BadParameter("the lengths are checked by the validation; drop --no-validate", param_hint="--check-lengths")
    from .export.run import export_run

    try:
        res = export_run(run_dir, dest or output, attention=attention, provider=provider, atol=atol,
                         validate=not no_validate, sparse_initializers=not dense_initializers, check_lengths=lengths)
    except ImportError as e:  # onnx / onnxruntime missing: the message names the extra to install
        raise _Failure(str(e)) from None
    m = res.metadata
    click.echo(f"wrote {res.path} ({res.size / 1e6:.2f} MB): density {m['density']:.3f}, "
               f"{len(res.sparse_initializers)} weights stored sparse, attention {_patterns(m['attention'])}")
    if res.max_diff is not None:
        checked = f" (also at sequence lengths {', '.join(map(str, lengths))})" if lengths else ""
        per_output = ", ".join(f"{name} {d:.2g}" for name, d in res.max_diff.items())
        click.echo(f"onnxruntime ({provider}) matches PyTorch within {atol:g}{checked}: max |difference| per output: {per_output}")


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"{text!r} is invalid: expected sequence lengths like 16,64,128", param_hint="--check-lengths")
    return lengths


def _patterns(attention) -> str:
    """'sparse' when every site agrees, else 'site=pattern, ...'."""
    if not isinstance(attention, dict):
        return str(attention)
    kinds = set(attention.values())
    return kinds.pop() if len(kinds) == 1 else ", ".join(f"{k}={v}" for k, v in attention.items()) or "none"



def _plan_options(fn):
    from .train.options import click_options

    return click_options(fn, train_fields=("batch_size", "block_size", "grad_accum", "seed"), help={
        "batch_size": "Sequences per micro-batch, all devices together: an optimizer step takes --batch-size x --grad-accum."})


def _passive_omp() -> None:
    """OpenMP threads that spin while waiting steal the CPU from working ones whenever anything else
    runs on the machine (steps measured 4-9x slower on a busy 2-core box); set before torch loads."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _train_options(fn):
    from .train.options import click_options

    return click_options(fn)


@main.command(context_settings={"allow_extra_args": True})  # extra arguments: an unquoted glob, answered in train()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--config", "config_file", type=click.Path(dir_okay=False), show_default="none", help="TOML file with [train] and [mst] tables.")
@click.option("--out", type=click.Path(file_okay=False), show_default="runs/<name>-<timestamp>", help="Run folder.")
@click.option("--resume", type=click.Path(file_okay=False), show_default="none: a new run",
              help="Continue the run in this folder where it stopped (its own flags may be repeated; --lr, --min-lr and a longer --steps may change).")
@click.option("--dense", is_flag=True, help="Train the dense baseline: the same run without sparsity.")
@click.option("--fsdp", is_flag=True, help="Shard parameters, gradients, optimizer state and masks per block with FSDP2 "
              "instead of DDP replicas (under torchrun; alone: one rank).")
@click.option("--quiet", is_flag=True, help="No progress output; only the final summary.")
@_train_options
@_friendly
def train(model_file: str, config_file: str | None, out: str | None, resume: str | None, dense: bool, fsdp: bool, quiet: bool,
          **flags) -> None:
    """Train MODEL_FILE's model() with MST on the built-in corpus (or --data) and summarise the run.

    The defaults shown are the built-in ones; the model file's config() and train_config(), then
    --config, then the flags given here override them.

    Under torchrun (torchrun --nproc-per-node N -m mst_compile train MODEL_FILE ...) each process
    trains a DDP replica and --batch-size is per process; with --fsdp the processes shard the model per
    block with FSDP2 instead (the checkpoints stay whole: export and --resume read them as any run's).
    """
    _passive_omp()
    from .train.options import configs_for_model_file, split_flags

    train_flags, mst_flags = split_flags(flags)
    _no_extra_arguments(click.get_current_context().args, train_flags.get("data"))
    if dense:
        train_flags["dense"] = True
    if fsdp:
        train_flags["fsdp"] = True
    _check_train_paths(out, resume, config_file, train_flags)
    from .modelfile import load_model_file

    mf = load_model_file(model_file)  # a missing file fails here, before torch is imported
    if resume:  # the run's saved config, with the changes a resume may make (train/resume.py)
        from .run_folder import load_run_config
        from .train.resume import resume_configs

        tc, mst, changes = resume_configs(resume, load_run_config(resume), config_file, train_flags, mst_flags)
        if changes and not quiet:
            click.echo(f"resuming {resume} with {', '.join(changes)}", err=True)
    else:
        tc, mst = configs_for_model_file(mf, config_file, train_flags, mst_flags)
    from .train.loop import TrainingDiverged, TrainingInterrupted, summary_line
    from .train.loop import train as run_training

    try:
        summary = run_training(mf, tc, mst, out=out, resume=resume, progress=not quiet)
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    except (TrainingDiverged, ModelInputError) as e:  # the run (or the model) failed: exit 1
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise _Failure(f"{type(e).__name__}: {e}") from None
    if summary.get("rank", 0) == 0:
        click.echo(summary_line(summary))
    if summary.get("world_size", 1) > 1:  # every file is written and the process group destroyed: leave
        sys.stdout.flush()  # without interpreter teardown, where gloo's threads can abort a finished run
        sys.stderr.flush()  # (SIGABRT, "terminate called without an active exception") and fail torchrun
        os._exit(0)


def _no_extra_arguments(extra: list[str], data: str | None) -> None:
    """Arguments beyond MODEL_FILE: most likely a glob the shell expanded, which --data must get quoted."""
    if not extra:
        return
    if data is None:
        raise _Failure(f"unexpected extra argument(s) {' '.join(extra)}: mstc train takes one MODEL_FILE; quote a glob given to --data")
    paths = [Path(data), *map(Path, extra)]
    same = len({p.parent for p in paths}) == 1 and len({p.suffix for p in paths}) == 1
    pattern = str(paths[0].parent / f"*{paths[0].suffix}") if same else "PATTERN"
    raise _Failure(f"--data {data} is followed by {len(extra)} more path(s) ({' '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}): "
                   f"the shell expanded an unquoted glob; quote it so that mstc expands it: --data '{pattern}'")


def _check_train_paths(out: str | None, resume: str | None, config_file: str | None, train_flags: dict) -> None:
    """What ``mstc train`` can check without torch: a typo fails in well under a second."""
    from . import run_folder as rf
    from .paths import writable_dir
    from .train.options import read_config_file

    if resume:
        writable_dir(rf.existing(resume), "--resume")
    else:
        writable_dir(out or rf.RUNS, "--out" if out else "run folder")
    if config_file:
        read_config_file(config_file)
    if train_flags.get("data"):
        from .run_config import TrainConfig
        from .train.data import check_data  # numpy, not torch

        check_data(train_flags["data"], train_flags.get("tokenizer"), train_flags.get("val_fraction", TrainConfig.val_fraction),
                   data_dtype=train_flags.get("data_dtype"), text_field=train_flags.get("text_field"))


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _count(text: str, flag: str) -> float:
    """'295e9', '2.5B', '26b', '300M', '1,000,000' -> a positive number."""
    t = text.strip().replace(",", "").replace("_", "")
    mult = _SUFFIX.get(t[-1:].lower(), 1.0) if t else 1.0
    try:
        value = float(t[:-1] if mult != 1.0 else t) * mult
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise _Failure(f"{flag} {text!r} is invalid: expected a positive count such as 2.5e9, 2.5B or 300M")
    return value


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--tokens", required=True, help="Training tokens of the run: 2.5e9, 2.5B, 300M, ...")
@click.option("--hardware", default="local", help="local: time steps on this machine (its GPU, else its CPU); cpu: time "
              "them on this CPU; a100, h100, h200: estimate from FLOPs at the GPU's peak.")
@click.option("--peak-flops", default=None, show_default="the preset's", help="Peak bf16 FLOP/s of a GPU preset, e.g. 989e12.")
@click.option("--utilization", type=float, default=None, show_default="0.4", help="Fraction of a GPU preset's peak a dense step reaches.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), show_default="none", help="TOML file with [train] and [mst] tables.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@_plan_options
@_friendly
def plan(model_file: str, tokens: str, hardware: str, peak_flops: str | None, utilization: float | None,
         config_file: str | None, as_json: bool, quiet: bool, **flags) -> None:
    """Cost, time and expected quality gap of training MODEL_FILE (a model file or an HF config.json) with MST.

    Nothing is trained: the model is built and captured, one forward shows the FLOP ledger its
    footprint, and the schedule is walked with the ledger's formula. --batch-size, --grad-accum and
    --block-size set the step; the MST flags are mstc train's. On this machine (--hardware local or
    cpu) the hours are the steps times a dense step and an MST step per phase, timed here.
    """
    import json as _json

    from .planning import HARDWARE, MEASURED

    n_tokens = _count(tokens, "--tokens")
    if hardware.lower() not in (*MEASURED, *HARDWARE):
        raise _Failure(f"--hardware {hardware!r} is unknown: expected one of {', '.join((*MEASURED, *HARDWARE))}")
    if hardware.lower() in MEASURED and (peak_flops is not None or utilization is not None):
        flag = "--peak-flops" if peak_flops is not None else "--utilization"
        raise _Failure(f"{flag} applies to the GPU presets ({', '.join(HARDWARE)}); --hardware {hardware} is timed on this machine")
    if utilization is not None and not 0 < utilization <= 1:
        raise _Failure(f"--utilization {utilization:g} is invalid: expected a fraction of the peak in (0, 1]")
    _passive_omp()
    peak = None if peak_flops is None else _count(peak_flops, "--peak-flops")
    from .train.options import split_flags

    train_flags, mst_flags = split_flags(flags)
    if config_file:
        from .train.options import read_config_file

        read_config_file(config_file)
    path = Path(model_file)
    if path.suffix == ".json":
        from .train.options import build_configs

        tc, mst = build_configs(None, {}, config_file, train_flags, mst_flags)
        model = path
    else:
        from .modelfile import load_model_file
        from .train.options import configs_for_model_file

        model = load_model_file(path)
        tc, mst = configs_for_model_file(model, config_file, train_flags, mst_flags)
    from .planning import plan as make_plan

    result = make_plan(model, n_tokens, config=mst, block_size=tc.block_size, batch_size=tc.batch_size * tc.grad_accum,
                       hardware=hardware, peak_flops=peak, utilization=utilization,
                       progress=None if quiet else (lambda message: click.echo(message, err=True)))
    click.echo(_json.dumps(result.as_dict(), indent=1) if as_json else result.render())


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), show_default="RUN_DIR/report", help="Folder for the plots and report.md.")
@_friendly
def report(run_dirs: tuple[str, ...], out: str | None) -> None:
    """Plot RUN_DIRS (loss vs step and FLOPs, sparsity, attention, layer densities) and write report.md."""
    from .run_folder import REPORT
    from .train.report import write_report

    folder = write_report(list(run_dirs), out)
    click.echo(f"report: {folder / REPORT}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
