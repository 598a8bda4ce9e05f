"""The GPU check behind ``benchmarks/gpu_check.sh``: one table of kernel, attention, training-step,
test and ONNX figures, written row by row as they are measured.

    PYTHON=python3 bash benchmarks/gpu_check.sh --only kernels,attention   # part 1, under 5 minutes
    PYTHON=python3 bash benchmarks/gpu_check.sh --only train,tests         # part 2, under 5 minutes
    bash benchmarks/gpu_check.sh --dry-run                                 # CPU, tiny sizes: checks the script (CI)

Sections (each one row per case; every row is printed and appended to ``--table`` at once):

- kernels:   the tile-sparse linear (``mst::tile_linear``, Triton) forward + backward against cuBLAS
             (dense ``F.linear``) in bf16, 8192 tokens, at GPT-2-small (d=768) and GPT-2-medium
             (d=1024) shapes, tiles 32/64/128, tile densities 0.05-0.5; the first case of each tile
             also reports its largest difference to the masked dense result.
- parts:     each Triton kernel of the tile op alone (CUDA-event device time) against cuBLAS for the same
             product, at 8192 and 32768 tokens, and the weight gradient in one chunk of tokens vs split.
- attention: sparse HSA (on CUDA the residue-class kernel) vs causal SDPA on the flash backend,
             forward + backward, bf16, B=1, 12 heads of 64, T = 1024 / 4096 / 8192, l = T/8 and 128.
- train:     one AdamW step of a GPT-2-small-shaped GPT (12 layers, d=768, vocabulary 50257, B=8,
             T=1024) in bf16 autocast under ``torch.compile``: dense, MST ultra with 64x64 tiles on the
             Triton kernels, and MST ultra unstructured (masked dense GEMMs); 90% sparse, sparse
             attention, no topology update in the timed window. Tokens/s and peak memory.
- tests:     ``pytest -m cuda`` (the CUDA tests, the Triton tile kernels' among them); the summary line.
- onnx:      onnxruntime CUDAExecutionProvider latency, dense vs sparse-attention export of a 4-layer
             GPT; skipped with a note when onnxruntime-gpu is not installed.

Each part keeps to ``--budget`` seconds (default 290): a case that would start after it is listed as
skipped. ``--dry-run`` runs every section on CPU at tiny sizes (the tile linear on the blocked CPU
kernel, ``torch.compile`` with the eager backend), so CI keeps the script working; its figures mean
nothing. The script installs nothing and runs under whichever interpreter started it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mst_compile
from mst_compile.ops.attention import hsa_attention, mean_attended_keys
from mst_compile.ops.sparse_linear import SparseWeight
from mst_compile.ops.tile_layout import expand, grid

ROWS: list[tuple[str, str, str]] = []  # (section, case, result)
RUN: dict = {"table": None, "deadline": float("inf")}
CUDA_TESTS = ["tests/test_cuda.py", "tests/ops/test_attention_residue.py", "tests/train/test_device.py",
              "tests/export/test_validate_provider.py", "tests/ops/test_tile_triton.py"]


def _row(section: str, case: str, result: str) -> None:
    ROWS.append((section, case, result))
    print(f"  {section:9} {case:46} {result}", flush=True)
    if RUN["table"] is not None:
        with open(RUN["table"], "a") as f:
            f.write(f"| {section} | {case} | {result} |\n")


def _time_left(section: str, case: str, need: float) -> bool:
    """False (and a row saying so) when a case needing ``need`` seconds would overrun the budget."""
    if time.monotonic() + need <= RUN["deadline"]:
        return True
    _row(section, case, f"skipped: the part's time budget would run out (needs about {need:.0f} s)")
    return False


def _median_time(fn, device, reps: int, warmup: int = 1) -> float:
    return statistics.median(interleaved({"fn": fn}, reps, warmup=warmup, device=device)["fn"])


# -- kernels: the tile-sparse linear against cuBLAS --------------------------------------------
def _tiled(shape, tile, density, dtype, device, g):
    """A weight with exactly ``density`` of its tiles active, its SparseWeight on the tile kernel, and its mask."""
    scores = torch.rand(grid(shape, tile), generator=g)
    tm = scores <= scores.flatten().kthvalue(max(1, round(density * scores.numel()))).values
    mask = expand(tm, shape, tile).to(device)
    w = torch.nn.Parameter((torch.randn(shape, generator=g).to(device) * 0.02 * mask).to(dtype))
    sw = SparseWeight("w", w)
    sw.use_tiles(tile)
    sw.set_mask(mask)
    sw.select_kernel("tile")  # Triton on CUDA, the blocked kernel on CPU (dry run)
    return sw, w, mask


def _linear_step(linear, x, w, gy):
    """Forward + backward of ``linear(x, w)`` (both gradients)."""
    def run():
        x.grad = w.grad = None
        linear(x, w).backward(gy)
    return run


def kernels(device, dry: bool, reps: int) -> None:
    dtype = torch.float32 if dry else torch.bfloat16
    tokens = 64 if dry else 8192
    small = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of GPT-2 small: qkv, proj, fc, fc proj
    medium = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]
    shapes = [("S", s) for s in small[2:]] if dry else [("S", s) for s in small] + [("M", s) for s in medium]
    tiles, densities = ((32, 64) if dry else (32, 64, 128)), ((0.1, 0.5) if dry else (0.05, 0.1, 0.2, 0.3, 0.5))
    g = torch.Generator().manual_seed(0)
    for size, (n_in, n_out) in shapes:
        if not _time_left("kernels", f"GPT-2 {size} {n_in}x{n_out}", 10 if dry else 25):
            continue
        x = torch.randn(tokens, n_in, generator=g).to(device, dtype).requires_grad_()
        gy = torch.randn(tokens, n_out, generator=g).to(device, dtype)
        w = torch.nn.Parameter((torch.randn(n_out, n_in, generator=g) * 0.02).to(device, dtype))

        dense = _median_time(_linear_step(lambda x, w: F.linear(x, w), x, w, gy), device, reps)
        for tile in tiles:
            for k, d in enumerate(densities):
                sw, wt, mask = _tiled((n_out, n_in), tile, d, dtype, device, g)

                t = _median_time(_linear_step(sw, x, wt, gy), device, reps, warmup=2)  # the first call compiles the Triton kernels
                check = ""
                if k == 0:
                    with torch.no_grad():
                        diff = (sw(x, wt).float() - F.linear(x.float(), wt.float() * mask)).abs().max().item()
                    check = f", max abs difference to masked dense {diff:.2g}"
                _row("kernels", f"GPT-2 {size} {n_in}x{n_out} b={tile} d={d}",
                     f"cuBLAS {dense * 1e3:.3f} ms, tile {t * 1e3:.3f} ms, speedup {dense / t:.2f}x{check}")


# -- parts: where the tile-sparse linear spends its time ------------------------------------------
def _device_ms(fn, device, reps: int) -> float:
    """Median device time of ``fn`` in ms: CUDA events (triton.testing.do_bench), host overhead excluded."""
    if device.type != "cuda":
        return _median_time(fn, device, reps) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20 * reps, return_mode="median")


def _part_times(x, w, gy, lay, tile, device, reps) -> dict[str, float]:
    from mst_compile.ops import tile_triton

    return {
        "dense fwd": _device_ms(lambda: x @ w.t(), device, reps),
        "dense dW": _device_ms(lambda: gy.t() @ x, device, reps),
        "tile fwd": _device_ms(lambda: tile_triton.mm(x, w, lay.row_ptr, lay.cols, tile), device, reps),
        "tile dx": _device_ms(lambda: tile_triton.mm(gy, w.t(), lay.col_ptr, lay.rows_t, tile), device, reps),
        "tile dW one chunk": _device_ms(lambda: tile_triton.sddmm(gy, x, lay.rows, lay.cols, tile, split=1), device, reps),
        "tile dW split": _device_ms(lambda: tile_triton.sddmm(gy, x, lay.rows, lay.cols, tile), device, reps),
    }


def parts(device, dry: bool, reps: int) -> None:
    """Each kernel of the tile op alone (device time), against cuBLAS for the same product, and the
    weight-gradient kernel with the tokens in one chunk against the automatic split."""
    from mst_compile.ops.tile_layout import TileLayout

    dtype = torch.float32 if dry else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    cases = [((3072, 768), 64, 0.1, 64)] if dry else [((n_out, n_in), b, 0.1, tok) for (n_in, n_out) in ((768, 3072), (3072, 768))
                                                     for b in (64, 128) for tok in (8192, 32768)]
    for (n_out, n_in), tile, d, tokens in cases:
        name = f"{n_in}x{n_out} b={tile} d={d} N={tokens}"
        if not _time_left("parts", name, 5 if dry else 15):
            continue
        _, w, mask = _tiled((n_out, n_in), tile, d, dtype, device, g)
        w = w.detach()
        x = torch.randn(tokens, n_in, generator=g).to(device, dtype)
        gy = torch.randn(tokens, n_out, generator=g).to(device, dtype)
        if dry:  # the Triton kernels need a GPU or the interpreter: the dry run checks the loop only
            _row("parts", name, "dry run: no Triton timing")
            continue
        t = _part_times(x, w, gy, TileLayout(mask, tile), tile, device, reps)
        _row("parts", name, ", ".join(f"{k} {v:.3f} ms" for k, v in t.items()))


# -- attention: HSA against flash --------------------------------------------------------------
def _flash():
    """Causal SDPA pinned to the flash backend on CUDA (CPU: its own flash kernel anyway)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if torch.cuda.is_available() else contextlib.nullcontext()


def _fwd_bwd(attend, q, k, v, do):
    def run():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).backward(do)
    return run


def attention(device, dry: bool, reps: int) -> None:
    H, D = (2, 16) if dry else (12, 64)
    lengths = (64, 128) if dry else (1024, 4096, 8192)
    for T in lengths:
        if not _time_left("attention", f"T={T}", 5 if dry else 20):
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, H, T, D, generator=g).to(device, torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with _flash():
            dense = _median_time(_fwd_bwd(causal, q, k, v, do), device, reps)
        for l in sorted({T // 8, 4 if dry else 128}):
            sparse = lambda q, k, v, l=l: hsa_attention(q, k, v, pattern="sparse", stride=l)
            t = _median_time(_fwd_bwd(sparse, q, k, v, do), device, reps)
            ratio = (T + 1) / 2 / mean_attended_keys("sparse", T, l)
            _row("attention", f"T={T} l={l} fwd+bwd bf16", f"flash {dense * 1e3:.2f} ms, HSA {t * 1e3:.2f} ms, "
                 f"speedup {dense / t:.2f}x (flop ratio {ratio:.1f}x)")


# -- train: a compiled GPT-2-small step ---------------------------------------------------------
def _gpt_class():
    spec = importlib.util.spec_from_file_location("tiny_gpt_example", ROOT / "examples" / "tiny_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.GPT


def _train_step(net, opt, x, device, backend: str):
    compiled = torch.compile(net, backend=backend)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = compiled(x[:, :-1])  # (B, T, vocab)
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train(device, dry: bool, reps: int) -> None:
    tiny = {"vocab_size": 256, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}
    gpt2 = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
    shape = tiny if dry else gpt2
    B, T = (2, 32) if dry else (8, 1024)
    tile = 8 if dry else 64
    GPT = _gpt_class()
    x = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    modes = {"dense": None, f"mst ultra, {tile}x{tile} tiles": dict(tile=tile, sparse_kernel="tile"),
             "mst ultra, unstructured": dict(sparse_kernel="dense")}
    for mode, mst in modes.items():
        name = f"{'GPT tiny' if dry else 'GPT-2 small'} B={B} T={T} {mode}"
        if not _time_left("train", name, 10 if dry else 90):
            continue
        torch.manual_seed(0)
        net = GPT(**shape).to(device)
        if mst is not None:  # ultra from step 0: 90% sparse, sparse attention, the first update far away
            cfg = mst_compile.MSTConfig(update_interval=10_000, warmup_end=0.0, ultra_end=1.0, sparsity=0.9, **mst)
            net = mst_compile.sparsify(net, cfg, total_steps=100_000, example_inputs=(x[:, :-1],))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        if mst is not None:
            net.mst.attach(opt)
        step = _train_step(net, opt, x, device, "eager" if dry else "inductor")
        t0 = time.perf_counter()
        step()  # compiles
        compile_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = _median_time(step, device, reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        extra = ""
        if mst is not None:
            kernels_used = sorted({s.sparse.kernel for s in net.mst.weight_sites.values()})
            extra = f", density {net.mst.density():.2f}, kernels {'/'.join(kernels_used)}"
        _row("train", name, f"{B * T / t:,.0f} tokens/s, peak {peak:.1f} GiB, compile {compile_s:.0f} s{extra}")
        del step, net, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- tests: pytest -m cuda ---------------------------------------------------------------------
def tests(device, dry: bool, reps: int) -> None:
    if importlib.util.find_spec("pytest") is None:
        _row("tests", "pytest -m cuda", "skipped: pytest is not installed in this interpreter")
        return
    limit = max(30.0, min(240.0, RUN["deadline"] - time.monotonic()))
    # -o addopts: one process, without the project's pytest-xdist options (a GPU host may not have the plugin);
    # the import mode stays the project's (test files in different folders may share a name)
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=-ra --import-mode=importlib", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TESTS]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        _row("tests", "pytest -m cuda", f"timed out after {limit:.0f} s: {_summary(out)}")
        return
    print("\n".join((p.stdout + p.stderr).splitlines()[-30:]), flush=True)
    _row("tests", "pytest -m cuda", _summary(p.stdout) + ("" if p.returncode in (0, 5) else f" (exit {p.returncode})"))


def _summary(out: str) -> str:
    lines = [ln.strip("= ").strip() for ln in out.splitlines() if any(w in ln for w in ("passed", "failed", "skipped", "error", "deselected"))]
    return lines[-1] if lines else "no summary"


# -- onnx ----------------------------------------------------------------------------------------
def onnx(device, dry: bool, reps: int) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        _row("onnx", "onnxruntime latency", "skipped: onnxruntime is not installed")
        return
    provider = "cpu" if dry else "cuda"
    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    if name not in ort.get_available_providers():
        _row("onnx", "onnxruntime latency", f"skipped: no {name} (pip install 'mst-compile[gpu]')")
        return
    shape = {"vocab_size": 256, "block_size": 64, "n_layer": 1, "n_head": 2, "n_embd": 32} if dry else \
        {"vocab_size": 256, "block_size": 2048, "n_layer": 4, "n_head": 8, "n_embd": 512}
    T = shape["block_size"]
    torch.manual_seed(0)
    sm = mst_compile.sparsify(_gpt_class()(**shape), mst_compile.MSTConfig(), total_steps=10)
    example = (torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0)),)
    with tempfile.TemporaryDirectory() as tmp:
        for attention_pattern in ("dense", "sparse"):
            path = Path(tmp) / f"{attention_pattern}.onnx"
            res = mst_compile.export_onnx(sm, path, example, attention=attention_pattern, provider=provider, sparse_initializers=False)
            sess = ort.InferenceSession(str(path), providers=[name])
            feed = {sess.get_inputs()[0].name: example[0].numpy()}
            t = _median_time(lambda sess=sess, feed=feed: sess.run(None, feed), torch.device("cpu"), reps)
            worst = max(res.max_diff.values(), default=0.0)
            _row("onnx", f"{provider} T={T} {attention_pattern} attention", f"{t * 1e3:.2f} ms, max difference to PyTorch {worst:.1g}")


SECTIONS = {"parts": parts, "kernels": kernels, "attention": attention, "train": train, "tests": tests, "onnx": onnx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (for CI)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections to run, from {', '.join(SECTIONS)}")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=290.0, help="seconds this run may take; later cases are skipped")
    ap.add_argument("--table", default="gpu_check.md", help="Markdown file the rows are appended to as they come")
    a = ap.parse_args()
    chosen = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"gpu_check: --only {a.only!r}: unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; use --dry-run for the CPU smoke run")
    RUN["deadline"] = time.monotonic() + a.budget
    device = torch.device("cpu" if a.dry_run else "cuda")
    reps = a.reps or (1 if a.dry_run else 10)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: figures are meaningless)"
    RUN["table"] = Path(a.table).resolve()
    with open(RUN["table"], "a") as f:
        f.write(f"\n## mst_compile GPU check on {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
                f"--only {','.join(chosen)}\n\n| section | case | result |\n|---|---|---|\n")
    print(f"mst_compile GPU check on {where}, torch {torch.__version__}; rows go to {RUN['table']}", flush=True)
    for name in chosen:
        try:
            SECTIONS[name](device, a.dry_run, reps)
        except Exception as e:  # one failed section must not hide the others' figures
            _row(name, "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    width = max((len(c) for _, c, _ in ROWS), default=4)
    print(f"\n| section   | {'case'.ljust(width)} | result |\n|-----------|{'-' * (width + 2)}|--------|")
    for s, c, r in ROWS:
        print(f"| {s:9} | {c.ljust(width)} | {r} |")
    if any(c == "FAILED" for _, c, _ in ROWS) or any(s == "tests" and ("failed" in r or "error" in r or "exit" in r) for s, _, r in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
