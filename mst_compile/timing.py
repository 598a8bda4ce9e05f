"""Time training steps of a model on this machine: what ``mstc plan --hardware local|cpu`` forecasts from.

A FLOP count divided by an assumed FLOP/s says little about a CPU: a model whose steps took 0.106 s
dense and 0.105 s MST on a 2-core machine was forecast, from a 32-core server's peak and the kernels'
speed-ups at large sizes, at 23.6 s and 1.50x. So the plan times the real thing: one dense training step of the model (forward, next-token loss, backward,
AdamW) and one MST step of the sparsified module in each phase's state (its mean density and its
attention patterns; the step also re-zeroes the masked weights, as MST's optimizer hook does). Each is
timed a few times after an untimed warm-up step (first-use costs: kernel compilation, allocation).

A plan whose batch is larger than ``TOKENS_PER_TIMED_STEP`` tokens is timed at fewer sequences: the
forward and backward scale with the sequences, the optimizer step does not. The AdamW steps run at
learning rate 0 and the model's weights are put back afterwards: planning trains nothing.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .capture import inference, split_inputs
from .modelfile import lm_loss

TOKENS_PER_TIMED_STEP = 8192  # a larger step is timed at fewer sequences and scaled (see the docstring)
REPEATS = 3  # timed steps per state, after one warm-up step
BUDGET_S = 20.0  # a state whose steps have taken this long stops after fewer repeats (at least one)


@dataclass
class StepTimes:
    """Measured seconds per training step: ``"dense"`` and each MST phase."""

    device: str  # e.g. "cpu, 2 threads" or "cuda, NVIDIA H200"
    batch_size: int  # sequences per timed step
    block_size: int
    forward_backward: dict[str, float]  # median seconds of forward + loss + backward of batch_size sequences
    optimizer: dict[str, float]  # median seconds of the optimizer step (MST: and the re-masking)
    repeats: dict[str, int]  # timed steps behind each median

    def step(self, state: str, batch_size: int) -> float:
        """Seconds of one optimizer step over ``batch_size`` sequences in ``state`` (``"dense"`` or a phase)."""
        return self.forward_backward[state] * batch_size / self.batch_size + self.optimizer[state]

    def as_dict(self) -> dict:
        return asdict(self)


def timed_batch(batch_size: int, block_size: int) -> int:
    """Sequences per timed step: the plan's batch, or fewer when it exceeds ``TOKENS_PER_TIMED_STEP`` tokens."""
    return max(1, min(batch_size, TOKENS_PER_TIMED_STEP // block_size))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda, {torch.cuda.get_device_name(device)}"
    n = torch.get_num_threads()
    return f"cpu, {n} thread{'s' if n != 1 else ''}"


def time_steps(model: nn.Module, sm: nn.Module, inputs: Callable, states: Mapping[str, tuple[float, dict]], *,
               batch_size: int, block_size: int, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> StepTimes:
    """Time ``model``'s dense step and ``sm``'s (``mst_compile.sparsify(model)``) MST step in each state.

    ``inputs(tokens)`` packs a (B, T) batch of token ids as the forward takes it; ``states[phase] =
    (sparsity, {site: (pattern, stride)})``. ``model``'s weights are the same after as before.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    b = timed_batch(batch_size, block_size)
    tokens = torch.zeros(b, block_size + 1, dtype=torch.long, device=device)  # the values do not change the time
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    fb, opt, n = {}, {}, {}
    try:
        model.to(device)
        sm.to(device)
        with inference(model):  # use_cache=False, as captured
            model.train(sm.mst.capture == "fx")  # torch.export captures in eval mode: its graph has no dropout
            fb["dense"], opt["dense"], n["dense"] = _time(model, inputs, x, y, None, device, clock)
        sm.train()
        for phase, (sparsity, patterns) in states.items():
            sm.mst.set_sparsity(sparsity)
            for site, (pattern, stride) in patterns.items():
                sm.mst.set_attention({site: pattern}, stride=stride)
            fb[phase], opt[phase], n[phase] = _time(sm, inputs, x, y, sm.mst.apply_masks, device, clock)
    finally:
        model.to(home)
        model.load_state_dict(saved)
        for p in model.parameters():
            p.grad = None
    return StepTimes(describe(device), b, block_size, fb, opt, n)


def _time(net: nn.Module, inputs: Callable, x: torch.Tensor, y: torch.Tensor, after: Callable | None,
          device: torch.device, clock: Callable[[], float]) -> tuple[float, float, int]:
    """(forward + backward, optimizer) median seconds over up to REPEATS steps after a warm-up step."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # every update is zero: the weights stay as they are
    args, kwargs = split_inputs(inputs(x))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fb, op, spent = [], [], 0.0
    for i in range(1 + REPEATS):
        sync()
        t0 = clock()
        lm_loss(net(*args, **kwargs), y).backward()
        sync()
        t1 = clock()
        opt.step()
        if after is not None:
            after()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = clock()
        if i:  # the first step pays first-use costs
            fb.append(t1 - t0)
            op.append(t2 - t1)
        spent += t2 - t0
        if i and spent > BUDGET_S:
            break
    return statistics.median(fb), statistics.median(op), len(fb)
