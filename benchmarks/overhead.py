"""Per-step cost of MST's runtime (masked ops + scheduler, topology updates amortised) vs the dense model.

    PYTHONPATH=. python benchmarks/overhead.py                        # tiny GPT, batch 32, T 128, ΔT 100
    PYTHONPATH=. python benchmarks/overhead.py --batch 8 --steps 60 --update-interval 25   # quicker

The tiny GPT of examples/tiny_gpt.py at its default size trains with AdamW three ways, one step of
each in turn so load on the machine hits all alike:

- dense:         the plain model
- mst warm-up:   sparsify + attach, dense start, cubic ramp (masks change at every update)
- mst ultra:     sparsify + attach at 90% sparsity from step 0

Both MST runs force the masked-dense linear kernel (``sparse_kernel="dense"``) and dense attention,
so they do the dense model's arithmetic and the difference is the runtime's own overhead: the
custom op, the gradient mask, re-masking after each step, the ledger's hooks, the dense gradient
on the step before each update and the updates themselves. Each run covers at least two updates.

Reported per variant: the amortised time per step (total / steps, updates included), the median
step, the extra cost of an update step, and a noise-robust amortised ratio
``(median step + update extra / ΔT) / dense median`` (the mean is pulled around by other work on a
shared machine, the median much less); ratios are against dense measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mst_compile


def _gpt_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_gpt_example", ROOT / "examples" / "tiny_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(kind: str, args):
    torch.manual_seed(0)
    model = _gpt_module().GPT(block_size=args.seq)
    if kind == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt
    common = dict(update_interval=args.update_interval, sparse_kernel="dense", attention="dense", sparsity=0.9)
    if kind == "mst warm-up":  # the warm-up spans the whole measured run
        cfg = mst_compile.MSTConfig(warmup_end=0.5, ultra_end=0.75, **common)
    else:
        cfg = mst_compile.MSTConfig(warmup_end=0.0, ultra_end=0.75, **common)
    sm = mst_compile.sparsify(model, cfg, total_steps=4 * args.steps)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-3)
    sm.mst.attach(opt)
    return sm, opt


def _step(model, opt, batch) -> None:
    logits = model(batch[:, :-1])  # (B, T, vocab)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _stepper(model, opt, batches):
    """A training step of ``model`` on the next of ``batches`` per call."""
    it = iter(batches)
    return lambda: _step(model, opt, next(it))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (default 2·ΔT + 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    args.steps = args.steps or 2 * args.update_interval + 2
    if args.steps < 2 * args.update_interval:
        p.error(f"--steps {args.steps} must cover two updates (>= 2 × --update-interval = {2 * args.update_interval})")
    if args.threads:
        torch.set_num_threads(args.threads)

    kinds = ["dense", "mst warm-up", "mst ultra"]
    runs = {k: _build(k, args) for k in kinds}
    n_params = sum(p.numel() for p in runs["dense"][0].parameters())
    print(f"tiny GPT ({n_params / 1e6:.2f}M parameters), batch {args.batch}, T {args.seq}, ΔT {args.update_interval}, "
          f"{args.steps} measured steps per variant, {torch.get_num_threads()} threads, torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    vocab = 256
    batches = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g) for _ in range(args.warmup + args.steps)]
    # round i trains every variant on batch i; the order alternates: no variant always goes first
    steps = {k: _stepper(*runs[k], batches) for k in kinds}
    times = interleaved(steps, args.steps, warmup=args.warmup, alternate=True)

    dense_mean = statistics.fmean(times["dense"])
    dense_med = statistics.median(times["dense"])
    print()
    print("| variant | amortised ms/step | ratio | median ms/step | median ratio | updates | update step extra ms | robust amortised ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in kinds:
        t = times[k]
        mean, med = statistics.fmean(t), statistics.median(t)
        updates, extra, robust = "-", "-", "1.000"
        if k != "dense":
            mst = runs[k][0].mst
            start = mst.step_count - len(t)  # steps are counted from attach; the warm-up steps came first
            upd = [j for j in range(len(t)) if (start + j + 1) % args.update_interval == 0]
            updates = str(len(upd))
            x = statistics.fmean(t[j] for j in upd) - med if upd else 0.0
            extra = f"{x * 1e3:.1f}"
            robust = f"{(med + x / args.update_interval) / dense_med:.3f}"
        print(f"| {k} | {mean * 1e3:.1f} | {mean / dense_mean:.3f} | {med * 1e3:.1f} | {med / dense_med:.3f} | "
              f"{updates} | {extra} | {robust} |")
    ultra = runs["mst ultra"][0].mst
    print(f"\nultra run: density {ultra.density():.3f}, last update {ultra.last_update}")
    print("target: amortised ratio <= 1.05 at ΔT 100 (timing noise from other work on the machine shows in the median column)")


if __name__ == "__main__":
    main()
