"""The GPU check behind ``benchmarks/gpu_check.sh``: one table of HSA, training-step and ONNX figures.

    PYTHONPATH=. python benchmarks/gpu_check.py [--dry-run] [--tests "12 passed"] [--only hsa,train,onnx]

Sections (each one row per case, printed together as one table at the end):

- hsa:   sparse HSA (``hsa_attention``, on CUDA the residue-class kernel) vs causal SDPA on the flash
         backend, forward + backward, bf16, B=1, 12 heads of 64, T = 1024 / 4096 / 8192, l = T/8 and
         l = 128. ``flop ratio`` = dense attended keys / HSA attended keys (what a perfect kernel gains).
- train: one AdamW step of a GPT-2-small-shaped GPT (12 layers, 12 heads, d=768, vocabulary 50257,
         B=8, T=1024) in bf16 autocast under ``torch.compile``: dense vs MST in the ultra phase
         (90% sparse masked-dense linears, sparse attention, no update in the timed window).
         Tokens/s and peak memory. Masks are unstructured, so on a GPU the linears do the dense GEMMs:
         MST's saving there is algorithmic (FLOPs), the wall-clock cost is the runtime's overhead.
- onnx:  onnxruntime CUDAExecutionProvider latency of one forward, dense vs sparse-attention export of
         a 4-layer GPT (d=512, T=2048); skipped with a note when onnxruntime-gpu is not installed.

``--dry-run`` runs every section on CPU at tiny sizes (``torch.compile`` with the eager backend:
dynamo's capture and guards without code generation), so CI keeps the script working; its figures
mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mst_compile
from mst_compile.ops.attention import hsa_attention, mean_attended_keys

ROWS: list[tuple[str, str, str]] = []  # (section, case, result)


def _row(section: str, case: str, result: str) -> None:
    ROWS.append((section, case, result))
    print(f"  {section:6} {case:44} {result}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def hsa(device, dry: bool, reps: int) -> None:
    H, D = (2, 16) if dry else (12, 64)
    lengths = (64, 128) if dry else (1024, 4096, 8192)
    for T in lengths:
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
            _row("hsa", f"T={T} l={l} fwd+bwd bf16", f"flash {dense * 1e3:.2f} ms, HSA {t * 1e3:.2f} ms, "
                 f"speedup {dense / t:.2f}x (flop ratio {ratio:.1f}x)")


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
    GPT = _gpt_class()
    x = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    for mode in ("dense", "mst ultra"):
        torch.manual_seed(0)
        net = GPT(**shape).to(device)
        if mode != "dense":  # ultra from step 0: 90% sparse, sparse attention, the first update far away
            cfg = mst_compile.MSTConfig(total_steps=100_000, update_interval=10_000, warmup_end=0.0, ultra_end=1.0,
                                        sparse_kernel="dense")
            net = mst_compile.sparsify(net, cfg, example_inputs=(x[:, :-1],))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
        if mode != "dense":
            net.mst.attach(opt)
        step = _train_step(net, opt, x, device, "eager" if dry else "inductor")
        t0 = time.perf_counter()
        step()  # compiles
        compile_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = _median_time(step, device, reps)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        extra = f", density {net.mst.density():.2f}" if mode != "dense" else ""
        _row("train", f"{'GPT tiny' if dry else 'GPT-2 small'} B={B} T={T} {mode}",
             f"{B * T / t:,.0f} tokens/s, peak {peak:.1f} GiB, compile {compile_s:.0f} s{extra}")
        del step, net, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


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
    sm = mst_compile.sparsify(_gpt_class()(**shape), mst_compile.MSTConfig(total_steps=10))
    example = (torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0)),)
    with tempfile.TemporaryDirectory() as tmp:
        for attention in ("dense", "sparse"):
            path = Path(tmp) / f"{attention}.onnx"
            res = mst_compile.export_onnx(sm, path, example, attention=attention, provider=provider,
                                          sparse_initializers=False)
            sess = ort.InferenceSession(str(path), providers=[name])
            feed = {sess.get_inputs()[0].name: example[0].numpy()}
            t = _median_time(lambda sess=sess, feed=feed: sess.run(None, feed), torch.device("cpu"), reps)
            worst = max(res.max_diff.values(), default=0.0)
            _row("onnx", f"{provider} T={T} {attention} attention", f"{t * 1e3:.2f} ms, max difference to PyTorch {worst:.1g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (for CI)")
    ap.add_argument("--tests", default=None, help="summary line of the pytest -m cuda run, shown in the table")
    ap.add_argument("--only", default="hsa,train,onnx", help="comma-separated sections to run")
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; use --dry-run for the CPU smoke run")
    device = torch.device("cpu" if a.dry_run else "cuda")
    reps = a.reps or (1 if a.dry_run else 10)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: figures are meaningless)"
    if a.tests is not None:
        _row("tests", "pytest -m cuda", a.tests)
    sections = {"hsa": hsa, "train": train, "onnx": onnx}
    for name in a.only.split(","):
        try:
            sections[name.strip()](device, a.dry_run, reps)
        except Exception as e:  # one failed section must not hide the others' figures
            _row(name, "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    print(f"\nmst_compile GPU check on {where}, torch {torch.__version__}")
    width = max(len(c) for _, c, _ in ROWS)
    print(f"| section | {'case'.ljust(width)} | result |\n|---------|{'-' * (width + 2)}|--------|")
    for s, c, r in ROWS:
        print(f"| {s:7} | {c.ljust(width)} | {r} |")
    if any(c == "FAILED" for _, c, _ in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    main()
