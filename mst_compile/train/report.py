"""``mstc report``: PNG plots and a markdown summary of one or more run folders.

Plots (matplotlib, Agg backend, so no display is needed):
- ``loss.png``: train and val loss against steps and against cumulative training FLOPs, every run
  on the same axes (an MST run and its dense baseline side by side);
- ``sparsity.png``: density and target density over steps with the MST phases shaded and the
  topology updates marked;
- ``attention.png``: the pattern of every attention site over steps;
- ``layer_density.png``: per-layer density at the end of each MST run.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .. import run_folder as rf
from ..constants import ATTENTION_PATTERNS
from ..errors import MstCompileError
from ..paths import writable_dir
from .metrics import duration, human, read_jsonl

_PHASE_COLORS = {"warmup": "#fde0c5", "ultra": "#c9e4f6", "restoration": "#d5f0d2", "dense": "#eeeeee"}


class Run:
    def __init__(self, folder: Path):
        if not (folder / rf.METRICS).is_file():
            raise MstCompileError(f"{folder} is not a run folder: it has no metrics.jsonl (pass folders written by mstc train)")
        self.folder = folder
        self.name = folder.name
        rows = read_jsonl(folder / rf.METRICS)
        self.train = [r for r in rows if r.get("kind") == "train"]
        self.eval = [r for r in rows if r.get("kind") == "eval"]
        self.updates = [r for r in rows if r.get("kind") == "update"]
        s = folder / rf.SUMMARY
        self.summary = json.loads(s.read_text()) if s.is_file() else {}
        self.dense = self.summary.get("mode") == "dense" or bool(self.train) and self.train[0].get("phase") == "dense"
        if not self.train:
            raise MstCompileError(f"{folder}/metrics.jsonl has no training steps yet")

    @property
    def label(self) -> str:
        return f"{self.name} ({'dense' if self.dense else 'MST'})"


def _phase_spans(rows: list[dict]) -> list[tuple[str, int, int]]:
    """Contiguous (phase, start, end) spans; a record logged at step k covers the step (k-1, k]."""
    spans: list[list] = []
    prev = 0
    for r in rows:
        if spans and spans[-1][0] == r["phase"]:
            spans[-1][2] = r["step"]
        else:
            spans.append([r["phase"], prev, r["step"]])
        prev = r["step"]
    return [tuple(s) for s in spans]


def _plot_loss(runs: list[Run], path: Path, plt) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, run in enumerate(runs):
        color = f"C{i}"
        for ax, key in zip(axes, ("step", "flops")):
            xs = lambda rows, key=key: [r["step"] if key == "step" else r["mst_flops"] for r in rows]
            ax.plot(xs(run.train), [r["loss"] for r in run.train], color=color, alpha=0.35, lw=1)
            if run.eval:
                ax.plot(xs(run.eval), [r["val_loss"] for r in run.eval], "o-", color=color, ms=4, label=f"{run.label} val")
            ax.plot([], [], color=color, alpha=0.35, label=f"{run.label} train")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("cumulative training FLOPs (algorithmic count, docs/design.md §6)")
    axes[1].set_xscale("log")  # MST's whole run can be a fraction of the dense one: a log axis shows both
    for ax, title in zip(axes, ("loss vs step", "loss vs FLOPs")):
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sparsity(runs: list[Run], path: Path, plt) -> None:
    runs = [r for r in runs if not r.dense] or runs[:1]
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 3.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for phase, a, b in _phase_spans(run.train):
            ax.axvspan(a, b, color=_PHASE_COLORS.get(phase, "#f4f4f4"), lw=0)
            ax.text((a + b) / 2, 1.02, phase, ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
        steps = [r["step"] for r in run.train]
        # the value logged at step k held over the steps (previous record, k]
        ax.step(steps, [r["density"] for r in run.train], where="pre", color="C0", lw=2, label="density (active / total)")
        ax.step(steps, [1 - r.get("target_sparsity", 0.0) for r in run.train], "--", where="pre", color="C3", lw=1, label="target density")
        if run.updates:
            ax.plot([u["step"] for u in run.updates], [0.0] * len(run.updates), "|", color="k", ms=10, label="topology update")
            ever = [u for u in run.updates if u.get("ever_active") is not None]
            if ever:
                ax.plot([u["step"] for u in ever], [u["ever_active"] for u in ever], ":", color="C2", label="ever active")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(0, max(steps))
        ax.set_ylabel("density")
        ax.set_title(run.label, pad=16)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never over the curves
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_attention(runs: list[Run], path: Path, plt) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap

    runs = [r for r in runs if not r.dense] or runs[:1]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 1.2 + 0.5 * max(1, max(len(r.train[-1].get("attention") or {}) for r in runs)) * len(runs)),
                             squeeze=False)
    cmap = ListedColormap(["#9e9e9e", "#4c9be8", "#f0a04b", "#d9534f"])
    for ax, run in zip(axes[:, 0], runs):
        sites = sorted({s for r in run.train for s in (r.get("attention") or {})})
        if not sites:
            ax.text(0.5, 0.5, "no attention sites (dense attention throughout)", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(run.label)
            continue
        grid = np.array([[ATTENTION_PATTERNS.index(r["attention"].get(s, "dense")) for r in run.train] for s in sites])  # (sites, logged steps)
        edges = [0] + [r["step"] for r in run.train]  # record k covers the steps (previous record, k]
        ax.pcolormesh(edges, np.arange(len(sites) + 1) - 0.5, grid, cmap=cmap, vmin=-0.5, vmax=3.5)
        ax.invert_yaxis()
        ax.set_yticks(range(len(sites)), sites, fontsize=7)
        ax.set_title(run.label)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(4)]
    fig.legend(handles, ATTENTION_PATTERNS, loc="upper right", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final_densities(run: Run) -> dict[str, float]:
    if run.summary.get("final_densities"):
        return run.summary["final_densities"]
    return next((r["densities"] for r in reversed(run.eval) if r.get("densities")), {})


def _plot_layer_density(runs: list[Run], path: Path, plt) -> None:
    import numpy as np

    mst = [r for r in runs if _final_densities(r)]
    layers = list(dict.fromkeys(n for r in mst for n in _final_densities(r)))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * max(1, len(layers))))
    if not layers:
        ax.text(0.5, 0.5, "no MST run among these (dense runs have density 1 everywhere)", ha="center", va="center")
        ax.set_axis_off()
    height = 0.8 / max(1, len(mst))
    for i, run in enumerate(mst):
        d = _final_densities(run)
        y = np.arange(len(layers)) + i * height
        vals = [d.get(n, np.nan) for n in layers]
        bars = ax.barh(y, vals, height=height, color=f"C{runs.index(run)}", label=run.label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=7, padding=2)
    if layers:
        ax.set_yticks(np.arange(len(layers)) + 0.4 - height / 2, layers, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("density at the end of training")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("per-layer density at the end")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, f=lambda x: f"{x:.4f}") -> str:
    return "-" if v is None else f(v)


def _step_s(run: Run) -> float | None:
    """Measured seconds per training step: the summary's, else from the last logged throughput."""
    if run.summary.get("step_s") is not None:
        return run.summary["step_s"]
    last = run.train[-1]
    if last.get("tokens_per_s") and last.get("tokens"):
        return last["tokens"] / last["step"] / last["tokens_per_s"]
    return None


def _markdown(runs: list[Run], images: list[str]) -> str:
    base = next((r for r in runs if r.dense and _step_s(r)), None)  # the dense step time, where known
    lines = ["# mst_compile training report", "", f"Runs: {', '.join(r.name for r in runs)}", "",
             "| run | mode | steps | train loss | val loss | MST FLOPs (alg.) | dense FLOPs (alg.) | alg. reduction "
             "| wall time | s/step (measured) | measured speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, last, step = r.summary, r.train[-1], _step_s(r)
        speedup = f"{_step_s(base) / step:.2f}x" if base is not None and step else "-"
        lines.append(
            f"| {r.name} | {'dense' if r.dense else 'MST'} | {s.get('steps', last['step'])} | {_fmt(s.get('train_loss'))} | "
            f"{_fmt(s.get('val_loss', r.eval[-1]['val_loss'] if r.eval else None))} | {human(last['mst_flops'])} | "
            f"{human(last['dense_flops'])} | {last['dense_flops'] / max(last['mst_flops'], 1):.2f}x | "
            f"{_fmt(s.get('wall_s'), duration)} | {_fmt(step, lambda x: f'{x:.3g}')} | {speedup} |")
    excluded = sorted({str(x) for r in runs for x in r.summary.get("excluded", [])})
    timing = (f"measured speed-up = s/step of the dense run {base.name} / s/step of the run" if base is not None
              else "train a dense baseline (mstc train --dense) to compare measured step times")
    lines += ["", "FLOPs are algorithmic counts of the rewritten linear and attention sites (docs/design.md §6): a sparse "
              "weight is charged for its active entries even where it runs as a dense matmul on a masked weight, "
              "so measured time shrinks less than the count; " + timing + "."
              + (f" Left out of both counts: {', '.join(excluded)}." if excluded else ""), ""]
    lines += [f"![{Path(i).stem}]({i})\n" for i in images]
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the plots and ``report.md`` for ``run_dirs``; return the folder they are in."""
    if not run_dirs:
        raise MstCompileError("mstc report needs at least one run folder")
    runs = []
    for d in run_dirs:
        p = Path(d)
        if not p.is_dir():
            raise MstCompileError(f"run folder {p} does not exist")
        runs.append(Run(p))
    if out is None:
        first = runs[0].folder
        out = first / rf.REPORT_DIR if len(runs) == 1 else first.parent / f"report-{datetime.now():%Y%m%d-%H%M%S}"
    out = writable_dir(out, "report folder")  # before the plots are drawn
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = ["loss.png", "sparsity.png", "attention.png", "layer_density.png"]
    _plot_loss(runs, out / images[0], plt)
    _plot_sparsity(runs, out / images[1], plt)
    _plot_attention(runs, out / images[2], plt)
    _plot_layer_density(runs, out / images[3], plt)
    (out / rf.REPORT).write_text(_markdown(runs, images))
    return out
