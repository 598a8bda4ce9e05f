"""Wall-clock speed of the CSR kernels against the masked-dense path, measured in the same run.

    PYTHONPATH=. python benchmarks/csr_kernels.py                 # both tables
    PYTHONPATH=. python benchmarks/csr_kernels.py --only layer    # per-layer table + crossover
    PYTHONPATH=. python benchmarks/csr_kernels.py --only step     # per-step table
    PYTHONPATH=. python benchmarks/csr_kernels.py --clock cpu --threads 1   # on a machine shared with other jobs
    PYTHONPATH=. python benchmarks/csr_kernels.py --only layer --clock cpu --threads 1 --package  # and ship the crossover

Per layer: forward + backward (input and weight gradients) of one sparse linear at GPT-2-small
shapes with 1024 tokens, dense (masked-dense op) vs CSR, at several densities; the crossover is the
density where the two cost the same (log-linear interpolation between measured densities).
``--package`` writes the lowest crossover of the shapes, the density below which
``sparse_kernel="auto"`` takes CSR, to ``mst_compile/ops/kernel_crossovers.json`` with this run's
measurements (``package_crossover``, which ``tiles.py --package`` uses too).
Per step: forward + backward + AdamW step of a GPT-2-small-shaped model in the ultra phase
(90% ER sparsity, sparse attention) on the CSR path vs the same model dense.

Times are the minimum over interleaved repeats (other work on the machine only adds time);
the ratios compare numbers measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import add_clock_option, best

import mst_compile
from mst_compile.config import MSTConfig
from mst_compile.ops.crossovers import csr_crossover
from mst_compile.ops.sparse_linear import SparseWeight

CROSSOVERS = Path(__file__).resolve().parents[1] / "mst_compile" / "ops" / "kernel_crossovers.json"
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out)
DENSITIES = [0.5, 0.35, 0.3, 0.25, 0.2, 0.1, 0.05]


def best_ms(fns: dict, reps: int, clock: str) -> dict[str, float]:
    """Best time (ms) of each function, running them in turn so drift hits all alike (after a warm-up
    round: caches, allocator, structure build)."""
    return {k: v * 1e3 for k, v in best(fns, reps, clock).items()}


def _layer_fn(sw: SparseWeight, kernel: str, x, w, b, gy):
    def run():
        sw.kernel = kernel
        w.grad = b.grad = x.grad = None
        sw(x, w, b).backward(gy)
    return run


def bench_layers(tokens: int = 1024, reps: int = 5, densities=DENSITIES, clock: str = "wall") -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in SHAPES:
        w = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) * 0.02)
        b = torch.nn.Parameter(torch.zeros(n_out))
        x = torch.randn(tokens, n_in, generator=g).requires_grad_(True)
        gy = torch.randn(tokens, n_out, generator=g)
        sw = SparseWeight("w", w)
        for d in densities:
            mask = torch.rand(n_out, n_in, generator=g) < d
            sw.set_mask(mask)
            with torch.no_grad():
                w.mul_(mask)
            t = best_ms({k: _layer_fn(sw, k, x, w, b, gy) for k in ("dense", "csr")}, reps, clock)
            rows.append(dict(shape=f"{n_in}x{n_out}", density=d, dense=t["dense"], csr=t["csr"]))
            print(f"  {n_in}x{n_out} d={d:<5} dense {t['dense']:7.1f} ms  csr {t['csr']:7.1f} ms  "
                  f"speedup {t['dense'] / t['csr']:.2f}x", file=sys.stderr, flush=True)
    return rows


def crossover(rows: list[dict], shape: str) -> float | None:
    """Density where CSR and dense cost the same (interpolated in log density), None if never."""
    pts = sorted((r["density"], math.log(r["dense"] / r["csr"])) for r in rows if r["shape"] == shape)
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s0 >= 0 > s1:  # CSR wins at d0, loses at d1
            f = s0 / (s0 - s1)
            return math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0)))
    if pts and all(s >= 0 for _, s in pts):
        return pts[-1][0]  # wins everywhere measured
    return None


def print_layer_table(rows: list[dict], tokens: int) -> None:
    print(f"\nPer layer, forward+backward, {tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print("| shape (in x out) | density | dense ms | csr ms | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['density']} | {r['dense']:.1f} | {r['csr']:.1f} | {r['dense'] / r['csr']:.2f}x |")
    print("\n| shape | crossover density (CSR faster below) |")
    print("|---|---|")
    for s in dict.fromkeys(r["shape"] for r in rows):
        c = crossover(rows, s)
        print(f"| {s} | {'never' if c is None else f'{c:.2f}'} |")
    print(f"(choose_linear_kernel uses {csr_crossover()}, from {CROSSOVERS.relative_to(CROSSOVERS.parents[2])})")


def lowest(crossovers) -> float:
    """The density "auto" takes a kernel below: the lowest break-even, so it is only taken where it was
    never measured slower; 0.0 (never taken) when it was never faster for some shape. Two decimals, as printed."""
    cs = list(crossovers)
    return 0.0 if not cs or any(c is None for c in cs) else round(min(cs), 2)


def rounded(c: float | None) -> float | None:
    return None if c is None else round(c, 2)


def measured(command: str, break_even: dict, tokens: int) -> dict:
    """Where and how a crossover was measured: the machine, the day, and the break-even densities of ``command``."""
    on = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, {tokens} tokens"
    return {"on": on + ", forward + backward against the masked-dense op", "date": time.strftime("%Y-%m-%d"), "break_even": {command: break_even}}


def csr_entry(rows: list[dict], command: str, tokens: int) -> dict:
    """The "csr" entry of the crossover file from the per-layer rows."""
    per_shape = {s: crossover(rows, s) for s in dict.fromkeys(r["shape"] for r in rows)}
    return {"density": lowest(per_shape.values()), "source": "benchmarks/csr_kernels.py --package: the lowest break-even density of the measured shapes",
            "results": "benchmarks/results/csr/layer.md (the printed tables, saved)",
            "measured": measured(command, {s: rounded(c) for s, c in per_shape.items()}, tokens)}


def command_line() -> str:
    """This run's command as the crossover file quotes it (without ``--package``)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return " ".join(["PYTHONPATH=.", *([f"OMP_NUM_THREADS={omp}"] if omp else []), "python", f"benchmarks/{Path(sys.argv[0]).name}",
                     *(a for a in sys.argv[1:] if a != "--package")])


def package_crossover(kind: str, entry: dict, path: Path = CROSSOVERS) -> None:
    """Write one kernel's entry ("csr" or "tile") of the crossover file that the kernel choice reads, keeping the others."""
    doc = json.loads(path.read_text())
    doc[kind] = entry
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote the {kind} crossover {entry['density']} to {path}")


# -- per step: a GPT-2-small-shaped model --------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT-shaped decoder: byte vocabulary, learned positions, tied lm_head."""

    def __init__(self, vocab=256, block_size=256, d=768, n_layer=12, n_head=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(_Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def _step_fn(model, idx, tgt):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_step(batch=4, T=256, n_layer=12, reps=3, sparsity=0.9, clock: str = "wall") -> dict:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (batch, T), generator=g)
    tgt = torch.randint(0, 256, (batch, T), generator=g)
    torch.manual_seed(0)
    dense = GPT(block_size=T, n_layer=n_layer)
    fns = {"dense model": _step_fn(dense, idx, tgt)}
    models = {}
    for kernel in ("dense", "auto"):
        torch.manual_seed(0)
        model = GPT(block_size=T, n_layer=n_layer)
        cfg = MSTConfig(sparsity=sparsity, distribution="er", sparse_kernel=kernel)
        sm = mst_compile.sparsify(model, cfg, example_inputs=(idx,))
        sm.mst.set_sparsity(sparsity)
        sm.mst.set_attention("sparse")
        picked = [sw.select_kernel(kernel) for sw in sm.mst.sparse_weights().values()]
        name = "MST masked-dense" if kernel == "dense" else "MST csr (auto)"
        models[name] = (sm, picked)
        fns[name] = _step_fn(sm, idx, tgt)
    t = best_ms(fns, reps, clock)
    sm = models["MST csr (auto)"][0]
    dens = sm.mst.densities()
    info = dict(density=sm.mst.density(), csr=models["MST csr (auto)"][1].count("csr"), sites=len(dens),
                min_d=min(dens.values()), max_d=max(dens.values()), tokens=batch * T)
    return dict(times=t, **info)


def print_step_table(res: dict) -> None:
    t, base = res["times"], res["times"]["dense model"]
    print(f"\nPer step (forward+backward+AdamW), GPT-2-small shape: d=768, 12 layers, 12 heads, T=256, "
          f"batch 4, vocab 256; ultra phase: {1 - res['density']:.0%} ER sparsity (densities "
          f"{res['min_d']:.3f}..{res['max_d']:.3f}), sparse attention; CSR on {res['csr']}/{res['sites']} weights")
    print("| model | ms/step | tokens/s | speedup vs dense |")
    print("|---|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.0f} | {res['tokens'] / v * 1e3:.0f} | {base / v:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("layer", "step"), default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per layer call in the per-layer table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--package", action="store_true", help=f"write the crossover to {CROSSOVERS.relative_to(CROSSOVERS.parents[2])} (needs the layer table)")
    add_clock_option(ap)
    args = ap.parse_args()
    if args.package and args.only == "step":
        ap.error("--package writes the crossover of the per-layer table: run it with --only layer (or without --only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {torch.get_num_threads()} threads, {args.clock} clock, best of {args.reps} interleaved runs")
    torch.manual_seed(0)
    if args.only in (None, "layer"):
        rows = bench_layers(tokens=args.tokens, reps=args.reps, clock=args.clock)
        print_layer_table(rows, args.tokens)
        if args.package:
            package_crossover("csr", csr_entry(rows, command_line(), args.tokens))
    if args.only in (None, "step"):
        print_step_table(bench_step(reps=args.reps, clock=args.clock))


if __name__ == "__main__":
    main()
