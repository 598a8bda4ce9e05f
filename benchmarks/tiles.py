"""Wall-clock speed of tile-structured MST on CPU: the blocked tile kernel against the masked-dense op,
measured side by side in one run.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tiles.py --clock cpu --threads 1             # both tables
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tiles.py --only layer --clock cpu --threads 1  # crossovers
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/tiles.py --only layer --clock cpu --threads 1 --package  # and ship them

Per layer: forward + backward (input and weight gradients) of one tile-structured sparse linear at
GPT-2-small shapes with 1024 tokens: the masked-dense op against the blocked kernel at tiles 8..128
and tile densities 0.05..0.5; the crossover is the tile density where both cost the same.
``--package`` writes per tile edge the lowest crossover of the shapes, the tile density below which
``sparse_kernel="auto"`` takes the blocked kernel, to ``mst_compile/ops/kernel_crossovers.json``.
Per step: forward + backward + AdamW step of a GPT-2-small-shaped model (d=768, 12 layers, 1024
tokens) with MST attached in the ultra phase (90% sparse, ER over tiles, sparse attention, no
topology update in the timed steps) against the same model dense, and against unstructured MST.

Times are the minimum over interleaved repeats (other work on the machine only adds time).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.nn.functional as F
from _timing import add_clock_option

# the model, its shapes, the crossover file
from csr_kernels import CROSSOVERS, GPT, SHAPES, best_ms, command_line, lowest, measured, package_crossover, rounded

import mst_compile
from mst_compile import MSTConfig
from mst_compile.constants import TILES
from mst_compile.ops import tile_cpu
from mst_compile.ops.crossovers import kernel_crossovers
from mst_compile.ops.sparse_linear import SparseWeight
from mst_compile.ops.tile_layout import expand, grid

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def _layer_fn(sw: SparseWeight, x, w, b, gy):
    def run():
        w.grad = b.grad = x.grad = None
        sw(x, w, b).backward(gy)
    return run


def _tiled_weight(shape: tuple[int, int], tile: int, density: float, g: torch.Generator) -> tuple[SparseWeight, torch.nn.Parameter, float]:
    """A weight (out, in) with exactly ``density`` of its tiles active, on the blocked kernel."""
    n_out, n_in = shape
    w = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) * 0.02)
    scores = torch.rand(grid(shape, tile), generator=g)
    tm = scores <= scores.flatten().kthvalue(max(1, round(density * scores.numel()))).values
    mask = expand(tm, shape, tile)
    with torch.no_grad():
        w.mul_(mask)
    sw = SparseWeight("w", w)
    sw.use_tiles(tile)
    sw.set_mask(mask)
    sw.select_kernel("tile")
    return sw, w, float(tm.float().mean())


def bench_layers(tokens: int, reps: int, tiles=TILES, densities=DENSITIES, clock: str = "wall") -> list[dict]:
    """Per shape and tile, densities in increasing order, each timed interleaved with the masked-dense
    op; a tile stops at the first density where it is slower (its crossover is then bracketed)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in SHAPES:
        x = torch.randn(tokens, n_in, generator=g).requires_grad_(True)
        gy = torch.randn(tokens, n_out, generator=g)
        b = torch.nn.Parameter(torch.zeros(n_out))
        w_dense = torch.nn.Parameter(torch.randn(n_out, n_in, generator=g) * 0.02)
        dense = _layer_fn(SparseWeight("w", w_dense), x, w_dense, b, gy)  # the masked-dense op costs the same at any mask
        line = []
        for tile in tiles:
            for d in densities:
                sw, w, density = _tiled_weight((n_out, n_in), tile, d, g)
                t = best_ms({"dense": dense, "tile": _layer_fn(sw, x, w, b, gy)}, reps, clock)
                rows.append(dict(shape=f"{n_in}x{n_out}", tile=tile, target=d, density=density, dense=t["dense"], tile_ms=t["tile"]))
                line.append(f"b={tile} d={d}: {t['dense'] / t['tile']:.2f}x")
                if t["tile"] > t["dense"]:
                    break
        print(f"  {n_in}x{n_out}: " + ", ".join(line), file=sys.stderr, flush=True)
    return rows


def crossover(rows: list[dict], shape: str, tile: int) -> float | None:
    """Tile density where the tile kernel and dense cost the same (log-interpolated), None if never faster."""
    pts = sorted((r["density"], math.log(r["dense"] / r["tile_ms"])) for r in rows if r["shape"] == shape and r["tile"] == tile)
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s0 >= 0 > s1:
            return math.exp(math.log(d0) + s0 / (s0 - s1) * (math.log(d1) - math.log(d0)))
    if pts and all(s >= 0 for _, s in pts):
        return pts[-1][0]  # faster everywhere measured
    return None


def print_layer_table(rows: list[dict], tokens: int) -> None:
    tiles = sorted({r["tile"] for r in rows})
    densities = sorted({r["target"] for r in rows})
    print(f"\nPer layer, forward+backward, {tokens} tokens, fp32, {torch.get_num_threads()} threads: speed-up of the blocked "
          "tile kernel over the masked-dense op")
    print("| shape (in x out) | dense ms | " + " | ".join(f"b={b}" for b in tiles) + " |")
    print("|---|---|" + "---|" * len(tiles))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        cells = []
        for b in tiles:
            cells.append(", ".join(f"{r['dense'] / r['tile_ms']:.2f}x@{r['density']:.2g}" for r in mine if r["tile"] == b))
        print(f"| {shape} | {mine[0]['dense']:.1f} | " + " | ".join(cells) + " |")
    print("\n(a tile's row stops at the first density where it was slower than dense; '-': not measured for every shape)")
    print("| tile | mean speed-up at " + ", ".join(f"{d:g}" for d in densities) + " | crossover per shape | lowest |")
    print("|---|---|---|---|")
    for b in tiles:
        means = []
        for d in densities:
            sel = [r["dense"] / r["tile_ms"] for r in rows if r["tile"] == b and r["target"] == d]
            means.append(f"{sum(sel) / len(sel):.2f}x" if len(sel) == len(SHAPES) else "-")
        cs = [crossover(rows, s, b) for s in dict.fromkeys(r["shape"] for r in rows)]
        low = None if any(c is None for c in cs) else min(cs)
        print(f"| {b} | {', '.join(means)} | {', '.join('never' if c is None else f'{c:.2f}' for c in cs)} | "
              f"{'never' if low is None else f'{low:.2f}'} |")
    print(f"(choose_tile_kernel uses {kernel_crossovers()['tile']['density']}, from {CROSSOVERS.relative_to(CROSSOVERS.parents[2])})")


def tile_entry(rows: list[dict], command: str, tokens: int) -> dict:
    """The "tile" entry of the crossover file from the per-layer rows: per tile edge the lowest break-even of the shapes."""
    shapes = dict.fromkeys(r["shape"] for r in rows)
    per_tile = {str(b): {s: crossover(rows, s, b) for s in shapes} for b in sorted({r["tile"] for r in rows})}
    return {"density": {b: lowest(cs.values()) for b, cs in per_tile.items()},
            "source": "benchmarks/tiles.py --package: per tile edge the lowest break-even density of the measured shapes (0.0: never faster)",
            "results": "benchmarks/results/tiles/layer.md",
            "measured": measured(command, {b: {s: rounded(c) for s, c in cs.items()} for b, cs in per_tile.items()}, tokens)}


def _step_fn(model, idx, tgt, sm=None):
    """One AdamW training step of ``model`` (MST attached to the optimizer when ``sm`` is given)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if sm is not None:
        sm.mst.attach(opt)

    def step():
        logits = model(idx)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_step(tiles, reps: int, batch=4, T=256, n_layer=12, sparsity=0.9, clock: str = "wall") -> dict:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (batch, T), generator=g)
    tgt = torch.randint(0, 256, (batch, T), generator=g)
    torch.manual_seed(0)
    fns, info = {"dense model": _step_fn(GPT(block_size=T, n_layer=n_layer), idx, tgt)}, {}
    for tile in (*tiles, None):
        torch.manual_seed(0)
        model = GPT(block_size=T, n_layer=n_layer)
        # the ultra phase from step 0, no topology update in the timed steps (ΔT far away)
        cfg = MSTConfig(update_interval=50_000, warmup_end=0.0, ultra_end=1.0, sparsity=sparsity, tile=tile)
        sm = mst_compile.sparsify(model, cfg, total_steps=100_000, example_inputs=(idx,))
        step = _step_fn(sm, idx, tgt, sm)
        name = f"MST tiles {tile}x{tile}" if tile else "MST unstructured (csr auto)"
        kernels_used = [s.sparse.kernel for s in sm.mst.weight_sites.values()]
        info[name] = (sm.mst.density(), sum(k != "dense" for k in kernels_used), len(kernels_used))
        fns[name] = step
    return dict(times=best_ms(fns, reps, clock), info=info, tokens=batch * T)


def print_step_table(res: dict) -> None:
    t, base = res["times"], res["times"]["dense model"]
    print("\nPer step (forward+backward+AdamW, MST attached), GPT-2-small shape: d=768, 12 layers, 12 heads, T=256, batch 4, "
          "vocab 256; ultra phase: 90% sparsity (ER), sparse attention")
    print("| model | density | sparse-kernel sites | ms/step | tokens/s | speed-up vs dense |")
    print("|---|---|---|---|---|---|")
    for k, v in t.items():
        d, n, of = res["info"].get(k, (1.0, 0, 0))
        print(f"| {k} | {d:.3f} | {n}/{of} | {v:.0f} | {res['tokens'] / v * 1e3:.0f} | {base / v:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("layer", "step"), default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per layer call in the per-layer table")
    ap.add_argument("--tiles", default=",".join(map(str, TILES)), help="tile edges of the per-layer table")
    ap.add_argument("--step-tiles", default="32,64", help="tile edges of the per-step table")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--package", action="store_true", help=f"write the crossovers to {CROSSOVERS.relative_to(CROSSOVERS.parents[2])} (needs the layer table)")
    add_clock_option(ap)
    args = ap.parse_args()
    tiles = tuple(int(b) for b in args.tiles.split(","))
    if args.package and (args.only == "step" or set(tiles) != set(TILES)):
        ap.error(f"--package writes a crossover for every tile edge: run the per-layer table (--only layer) with --tiles {','.join(map(str, TILES))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not tile_cpu.available():
        sys.exit(f"tiles: the blocked CPU tile kernel is not available ({tile_cpu.why_unavailable()})")
    print(f"# {torch.get_num_threads()} threads, {args.clock} clock, best of {args.reps} interleaved runs")
    if args.only in (None, "layer"):
        rows = bench_layers(args.tokens, args.reps, tiles, clock=args.clock)
        print_layer_table(rows, args.tokens)
        if args.package:
            package_crossover("tile", tile_entry(rows, command_line(), args.tokens))
    if args.only in (None, "step"):
        print_step_table(bench_step(tuple(int(b) for b in args.step_tiles.split(",")), args.reps, clock=args.clock))


if __name__ == "__main__":
    main()
