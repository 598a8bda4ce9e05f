"""Tables of benchmarks/fair.py: the LR x schedule screening, the pick it implies, and the seeded headline."""
from __future__ import annotations

import math
import statistics
from collections import Counter

from _methods import METHODS, VARIANTS


def _by(runs: list[dict], key) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def _loss(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4f}"


def best_lrs(doc: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{schedule: {method: (best lr, its val loss)}} over the finished runs."""
    out: dict = {}
    for (method, schedule), rs in _by(doc["runs"], lambda r: (r["method"], r["lr_schedule"])).items():
        r = min(rs, key=lambda r: r["val_loss"])
        out.setdefault(schedule, {})[method] = (r["lr"], r["val_loss"])
    return out


def pick(doc: dict) -> tuple[str, dict[str, float]]:
    """The schedule every method trains on (the one under which most methods reach their lowest loss; WSD
    on a tie) and each method's best peak LR under it."""
    best = best_lrs(doc)
    schedules = sorted(best)
    wins = {s: 0 for s in schedules}
    for m in {m for s in schedules for m in best[s]}:
        have = [s for s in schedules if m in best[s]]
        wins[min(have, key=lambda s: (best[s][m][1], s != "wsd"))] += 1
    schedule = max(schedules, key=lambda s: (wins[s], s == "wsd"))
    return schedule, {m: lr for m, (lr, _) in best[schedule].items()}


def tune_markdown(doc: dict) -> str:
    s, runs = doc["setup"], doc["runs"]
    lrs = sorted({r["lr"] for r in runs} | set(s["lrs"]))  # the grid and any octave added beyond its edge
    schedules = s["schedules"] + sorted({r["lr_schedule"] for r in runs} - set(s["schedules"]))
    cell = {(r["method"], r["lr_schedule"], r["lr"]): r for r in runs}
    lines = [f"### Peak-LR x schedule screening, {s['steps']} steps (built-in corpus, seed {s.get('seed', 0)})", "",
             f"Byte-level GPT (d={s['d']}, {s['n_layer']} layers, T={s['block_size']}, batch {s['batch_size']}); "
             f"WSD decays over the last {s['lr_decay']:.0%} of every run; final val loss on {s['final_eval_iters']} val "
             "batches, the same for every run. Bold: each method's best per schedule.", "",
             "| method | " + " | ".join(f"{sch} {lr:g}" for sch in schedules for lr in lrs) + " |",
             "|---|" + "---|" * (len(schedules) * len(lrs))]
    best = best_lrs(doc)
    for m in s["methods"]:
        row = []
        for sch in schedules:
            for lr in lrs:
                r = cell.get((m, sch, lr))
                text = "" if r is None else _loss(r["val_loss"])
                if r is not None and best.get(sch, {}).get(m, (None,))[0] == lr:
                    text = f"**{text}**"
                row.append(text)
        lines.append(f"| {METHODS[m].label} | " + " | ".join(row) + " |")
    if runs:
        schedule, chosen = pick(doc)
        tried = _by([r for r in runs if r["lr_schedule"] == schedule], lambda r: r["method"])
        edge = [m for m, lr in chosen.items() if lr in (min(r["lr"] for r in tried[m]), max(r["lr"] for r in tried[m]))]
        lines += ["", f"Schedule for every method: **{schedule}** (the one under which most methods reach their lowest "
                  "loss). Peak LR per method under it: " + ", ".join(f"{METHODS[m].label} {lr:g}" for m, lr in chosen.items()) + "."]
        if edge:
            lines.append(f"At the edge of the grid (a wider grid might find better): {', '.join(METHODS[m].label for m in edge)}.")
        sized = {r["method"]: r for r in runs if r["method"] in ("dense_avg", "dense_narrow", "dense_shallow", "static_eq")}
        if sized:
            lines += ["", "Sized baselines: " + "; ".join(
                f"{METHODS[m].label}: " + (f"d={r['d']}, {r['n_layer']} layers, {r['n_head']} heads, {r['params']:,} parameters"
                                           if "params" in r else "diverged") + (f", sparsity {r['sized']['sparsity']}" if r.get("sized") else "")
                for m, r in sized.items()) + f" (MST's average active parameters: {s['avg_active_params']:,.0f})."]
    lines += ["", commands(doc), ""]
    return "\n".join(lines)


def commands(doc: dict) -> str:
    """The command(s) that wrote ``doc``, as markdown."""
    cmds = doc["command"] if isinstance(doc["command"], list) else [doc["command"]]
    return ("Command: " if len(cmds) == 1 else "Commands: ") + "; ".join(f"`{c}`" for c in cmds)


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def confirm_markdown(doc: dict) -> str:
    s, runs = doc["setup"], doc["runs"]
    seeds = [int(x) for x in str(s["seeds"]).split(",")]
    by_method = _by(runs, lambda r: r["method"])
    dense = {r["seed"]: r for r in by_method.get("dense", [])}
    dense_flops = next((r["mst_flops"] for r in dense.values()), None)
    lines = [f"### Every method on one schedule ({s['schedule']}), tuned peak LR, {len(seeds)} seeds, {s['steps']} steps", "",
             f"Byte-level GPT (d={s['d']}, {s['n_layer']} layers, T={s['block_size']}, batch {s['batch_size']}), data "
             f"{s['data']}, seeds {s['seeds']}; final val loss on {s['final_eval_iters']} val batches, the same for every run. "
             "Mean over the seeds finished so far, spread = max - min across seeds.", "",
             "| method | parameters | steps | peak LR | seeds | val loss (mean) | spread | gap to dense | algorithmic FLOP reduction | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [m for m in METHODS if m in by_method]
    for m in order:
        rs = sorted(by_method[m], key=lambda r: r["seed"])
        ok = [r for r in rs if math.isfinite(r["val_loss"])]
        if not ok:
            lines.append(f"| {METHODS[m].label} | | | | {len(rs)} | diverged | | | | |")
            continue
        losses = [r["val_loss"] for r in ok]
        mean = statistics.fmean(losses)
        gaps = [_pct(r["val_loss"], dense[r["seed"]]["val_loss"]) for r in ok if r["seed"] in dense]
        gap = "-" if m == "dense" or not gaps else f"{statistics.fmean(gaps):+.1f}%"
        red = "-" if dense_flops is None else f"{dense_flops / ok[0]['mst_flops']:.2f}x"
        size = f"{ok[0]['params'] / 1e3:.0f}k (d={ok[0]['d']}, L={ok[0]['n_layer']})"
        lines.append(f"| {METHODS[m].label} | {size} | {ok[0]['steps']} | {ok[0]['lr']:g} | {len(ok)} | {mean:.4f} | "
                     f"{max(losses) - min(losses):.4f} | {gap} | {red} | {statistics.fmean(r['wall_s'] for r in ok) / 60:.1f} min |")
    for lead in [m for m in ("mst", *VARIANTS) if m in by_method]:
        lines += _paired(lead, by_method, order, seeds)
    lines += ["", f"Peak LRs from {_tuned_from(s['tuned'])}. {commands(doc)}. Wall times are from a shared 2-core machine: "
              "compare FLOPs and losses, not minutes.", ""]
    if doc.get("superseded"):  # runs a later confirm at a new LR replaced
        old = sorted(doc["superseded"], key=lambda r: (r["method"], r["seed"]))
        lines += ["Superseded (a later confirm at a new LR replaced them; kept in results.json): " + "; ".join(
            f"{METHODS[r['method']].label} seed {r['seed']} at {r['lr']:g}: {r['val_loss']:.4f}" for r in old) + ".", ""]
    return "\n".join(lines)


def _paired(lead: str, by_method: dict, order: list[str], seeds: list[int]) -> list[str]:
    """``lead`` against each method, paired by seed, and whether its sign holds at every seed."""
    mst = {r["seed"]: r for r in by_method[lead]}
    name = METHODS[lead].label
    lines = ["", f"{name} against each method, paired by seed (negative: it ends below):", "",
             "| against | " + " | ".join(f"seed {x}" for x in seeds) + " | holds at every seed |", "|---|" + "---|" * (len(seeds) + 1)]
    for m in order:
        if m == lead:
            continue
        other = {r["seed"]: r for r in by_method[m]}
        cells, signs = [], []
        for x in seeds:
            if x in mst and x in other:
                g = _pct(mst[x]["val_loss"], other[x]["val_loss"])
                cells.append(f"{g:+.1f}%")
                signs.append(g < 0)
            else:
                cells.append("")
        done = len(signs) == len(seeds)
        short = "MST" if lead == "mst" else "variant"
        verdict = (f"{short} below" if all(signs) else f"{short} above" if not any(signs) else "mixed") if done else \
            f"pending ({len(signs)} of {len(seeds)} seeds)"
        lines.append(f"| {METHODS[m].label} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def _tuned_from(tuned) -> str:
    """``path`` (one tune file for every method), else the most common file and the methods read from others."""
    if isinstance(tuned, str):
        return f"`{tuned}`"
    files = [f for f, _ in Counter(tuned.values()).most_common()]
    others = "; ".join(f"{', '.join(METHODS[m].label for m in tuned if tuned[m] == f)} from `{f}`" for f in files[1:])
    return f"`{files[0]}`" + (f" ({others})" if others else "")

