"""MST from your own training loop: AdamW, attach, evaluation, checkpoint, resume.

    python examples/own_loop.py --steps 300                # trains, checkpoints to own_loop.pt
    python examples/own_loop.py --steps 300 --stop-after 100 && python examples/own_loop.py --steps 300
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.train.data import load_data

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_gpt import GPT  # (the nanoGPT-style model beside this file)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=300)
p.add_argument("--ckpt", default="own_loop.pt", help="checkpoint file; resumed from when it exists")
p.add_argument("--stop-after", type=int, default=None, help="save and stop after this step (run again to resume)")
args = p.parse_args()

B, T = 8, 64
torch.manual_seed(0)
model = GPT(block_size=T, n_layer=2, n_embd=64)
cfg = mst_compile.MSTConfig(update_interval=max(1, args.steps // 20))
sm = mst_compile.sparsify(model, cfg, total_steps=args.steps)  # shares its parameters with model: training sm trains model
opt = torch.optim.AdamW(sm.parameters(), lr=3e-3, weight_decay=0.1)
sm.mst.attach(opt)  # from now on every opt.step() also advances MST (masks, schedule, FLOP ledger)
data = load_data(None, None, val_fraction=0.05)  # built-in corpus (the Python standard library), bytes


def loss_on(split: str, key: tuple) -> torch.Tensor:
    x, y = data.batch(split, key, B, T, seed=0)  # (B, T), (B, T): the same batches on a resume
    logits = sm(x)  # (B, T, 256)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate() -> float:
    sm.eval()
    val = sum(loss_on("val", (i,)).item() for i in range(4)) / 4
    sm.train()
    return val


def save(step: int) -> None:
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                "mst": sm.mst.state_dict()}, args.ckpt)  # sm.mst: masks, schedule position, RNG, ledger


start = 0
if os.path.exists(args.ckpt):  # resume exactly where the checkpoint stopped
    ck = torch.load(args.ckpt, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sm.mst.load_state_dict(ck["mst"])
    start = ck["step"]

for step in range(start, args.steps):
    loss = loss_on("train", (step,))
    loss.backward()
    opt.step()  # MST re-masks, counts FLOPs and, every update_interval steps, updates the topology
    opt.zero_grad(set_to_none=True)
    done = step + 1
    if done % 50 == 0 or done == args.steps:
        print(f"step {done}: loss {loss.item():.3f}, val {evaluate():.3f}, phase {sm.mst.phase}, "
              f"density {sm.mst.density():.3f}, FLOP reduction {sm.mst.flops.reduction:.2f}x")
    if done == args.stop_after or done == args.steps:
        save(done)
        if done == args.stop_after:
            break
