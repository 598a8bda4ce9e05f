"""ONNX export: file size with sparse initializers, and onnxruntime vs PyTorch eager latency.

    PYTHONPATH=. python benchmarks/export.py [--reps 40] [--seq 128] [--threads 1] [--skip size|latency]

Model: the byte-level GPT of ``examples/tiny_gpt.py`` (d=128, 4 layers, 4 heads, T=128, vocabulary
256, tied ``lm_head``), seed 0, its weights pruned by magnitude to each density with the ER
distribution (``sm.mst.set_sparsity``), exported with ``mst_compile.export_onnx`` (validated).

- size: the same export with every weight stored dense (``sparse_initializers=False``) vs COO
  sparse initializers, at densities 1.0 / 0.5 / 0.2 / 0.1 (target at 0.1: >= 2.5x smaller).
- latency: forward pass, batch 1 and 8 at T=seq, density 0.1. ``dense attention`` is the default
  export at the end of training against the user's model in eager PyTorch; ``sparse attention`` is
  ``attention="sparse"`` against the sparsified module in eager PyTorch (HSA kernels). The two sides
  alternate call by call and each keeps its median, so background load hits both alike.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import warnings
from pathlib import Path

import torch
from _timing import interleaved

import mst_compile
from mst_compile.export.validate import import_onnxruntime

ROOT = Path(__file__).resolve().parents[1]


def _gpt():
    spec = importlib.util.spec_from_file_location("tiny_gpt_example", ROOT / "examples" / "tiny_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.GPT()


def _build(density: float, seq: int):
    model = _gpt().eval()
    example = (torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(0)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = mst_compile.sparsify(model, example_inputs=example)
    if density < 1.0:
        sm.mst.set_sparsity(1.0 - density)
    return model, sm, example


def sizes(out: Path, seq: int) -> list[tuple]:
    rows = []
    for density in (1.0, 0.5, 0.2, 0.1):
        _, sm, example = _build(density, seq)
        dense = mst_compile.export_onnx(sm, out / f"d{density}_dense.onnx", example, sparse_initializers=False)
        sparse = mst_compile.export_onnx(sm, out / f"d{density}_coo.onnx", example)
        rows.append((density, sm.mst.density(), dense.size, sparse.size, len(sparse.sparse_initializers),
                     len(sm.mst.densities())))
        print(f"density {density}: dense {dense.size:,} B, sparse {sparse.size:,} B", file=sys.stderr)
    return rows


def _session(path, threads: int):
    """onnxruntime on CPU with ``threads`` threads and no spin-waiting: spinning threads would steal
    the cores from PyTorch's turn right after each onnxruntime call."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _median_pair(f_ort, f_torch, reps: int) -> tuple[float, float]:
    t = interleaved({"ort": f_ort, "torch": f_torch}, reps, warmup=3)  # warm-up: allocations, thread pools
    return statistics.median(t["ort"]), statistics.median(t["torch"])


def latency(out: Path, seq: int, reps: int) -> list[tuple]:
    model, sm, example = _build(0.1, seq)
    rows = []
    for attention in ("dense", "sparse"):
        path = out / f"latency_{attention}.onnx"
        mst_compile.export_onnx(sm, path, example, attention=None if attention == "dense" else attention)
        sess = _session(path, torch.get_num_threads())
        name = sess.get_inputs()[0].name
        if attention == "sparse":
            sm.mst.set_attention("sparse")
        eager = model if attention == "dense" else sm.eval()
        for batch in (1, 8):
            x = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch))
            feed = {name: x.numpy()}

            def run_torch(eager=eager, x=x):
                with torch.no_grad():
                    eager(x)

            t_ort, t_torch = _median_pair(lambda sess=sess, feed=feed: sess.run(None, feed), run_torch, reps)
            rows.append((attention, batch, t_torch * 1e3, t_ort * 1e3))
            print(f"{attention} attention, batch {batch}: torch {t_torch * 1e3:.2f} ms, ort {t_ort * 1e3:.2f} ms", file=sys.stderr)
        sm.mst.set_attention("dense")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mst_export_bench"))
    ap.add_argument("--threads", type=int, default=1, help="threads of both PyTorch and onnxruntime (1: robust to a busy machine)")
    ap.add_argument("--skip", choices=["size", "latency"], default=None, help="leave one of the two tables out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    size_rows = sizes(args.out, args.seq) if args.skip != "size" else []
    lat_rows = latency(args.out, args.seq, args.reps) if args.skip != "latency" else []
    print(f"\ntiny GPT (examples/tiny_gpt.py), T={args.seq}, torch {torch.__version__} with {torch.get_num_threads()} "
          f"thread(s), onnxruntime {import_onnxruntime().__version__} (as many threads, no spin-wait)\n")
    if size_rows:
        print("| target density | measured density | dense-initializer file | sparse-initializer file | smaller by | weights stored COO |")
        print("|---:|---:|---:|---:|---:|---:|")
    for d, measured, a, b, n, total in size_rows:
        print(f"| {d:g} | {measured:.3f} | {a / 1e6:.2f} MB | {b / 1e6:.2f} MB | {a / b:.2f}x | {n} of {total} |")
    if lat_rows:
        print("\n| attention | batch | PyTorch eager | onnxruntime (CPU) | onnxruntime speedup |")
        print("|---|---:|---:|---:|---:|")
    for attention, batch, t_torch, t_ort in lat_rows:
        print(f"| {attention} | {batch} | {t_torch:.2f} ms | {t_ort:.2f} ms | {t_torch / t_ort:.2f}x |")


if __name__ == "__main__":
    main()
