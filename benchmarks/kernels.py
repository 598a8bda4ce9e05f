"""Wall-clock speed of the CSR kernels against the masked-dense path, measured in the same run.

    PYTHONPATH=. python benchmarks/kernels.py                 # both tables
    PYTHONPATH=. python benchmarks/kernels.py --only layer    # per-layer table + crossover
    PYTHONPATH=. python benchmarks/kernels.py --only step     # per-step table

Per layer: forward + backward (input and weight gradients) of one sparse linear at GPT-2-small
shapes with 1024 tokens, dense (masked-dense op) vs CSR, at several densities; the crossover is the
density where the two cost the same (log-linear interpolation between measured densities).
Per step: forward + backward + AdamW step of a GPT-2-small-shaped model in the ultra phase
(90% ER sparsity, sparse attention) on the CSR path vs the same model dense.

Times are the minimum over interleaved repeats (other work on the machine only adds time);
the ratios compare numbers measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mst_compile.runtime.csr import CSR_CROSSOVER_DENSITY  # noqa: E402
from mst_compile.runtime.sparse_linear import SparseWeight  # noqa: E402

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out)
DENSITIES = [0.5, 0.3, 0.2, 0.15, 0.1, 0.05]


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Best time (ms) of each function, running them in turn so drift hits all alike."""
    for f in fns.values():
        f()  # warm-up (caches, allocator, structure build)
    best = {k: math.inf for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: v * 1e3 for k, v in best.items()}


def _layer_fn(sw: SparseWeight, kernel: str, x, w, b, gy):
    def run():
        sw.kernel = kernel
        w.grad = b.grad = x.grad = None
        sw(x, w, b).backward(gy)
    return run


def bench_layers(tokens: int = 1024, reps: int = 5, densities=DENSITIES) -> list[dict]:
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
            t = _interleaved({k: _layer_fn(sw, k, x, w, b, gy) for k in ("dense", "csr")}, reps)
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


def print_layer_table(rows: list[dict]) -> None:
    print(f"\nPer layer, forward+backward, 1024 tokens, fp32, {torch.get_num_threads()} threads")
    print("| shape (in x out) | density | dense ms | csr ms | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['density']} | {r['dense']:.1f} | {r['csr']:.1f} | {r['dense'] / r['csr']:.2f}x |")
    print("\n| shape | crossover density (CSR faster below) |")
    print("|---|---|")
    for s in dict.fromkeys(r["shape"] for r in rows):
        c = crossover(rows, s)
        print(f"| {s} | {'never' if c is None else f'{c:.2f}'} |")
    print(f"(choose_kernel uses CSR_CROSSOVER_DENSITY = {CSR_CROSSOVER_DENSITY})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("layer", "step"), default=None)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only in (None, "layer"):
        print_layer_table(bench_layers(reps=args.reps))


if __name__ == "__main__":
    main()
