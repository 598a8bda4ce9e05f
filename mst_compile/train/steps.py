"""What one batch goes through, shared by the training step, evaluation and the benchmarks: how the
model is called on token ids (what its output means and the loss live in ``modelfile``, which
``mstc plan`` shares); and the stop request of Ctrl-C."""
from __future__ import annotations

import signal
import threading

import torch

from ..capture import split_inputs
from ..errors import MstCompileError
from ..modelfile import lm_loss, logits_of  # noqa: F401 - the loop and the benchmarks take them from here


def run_model(net, inputs, x: torch.Tensor):
    """``net`` on a (B, T) batch of token ids, passed as ``inputs`` (``ModelFile.inputs_for``) says."""
    args, kwargs = split_inputs(inputs(x))
    return net(*args, **kwargs)


class StopRequest:
    """First Ctrl-C/SIGTERM asks the loop to checkpoint and stop after the current step; a second aborts."""

    def __init__(self):
        self.requested, self._old = False, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def check_model_runs(model, inputs, x, data) -> None:
    """One forward on real tokens before anything is written: a wrong model is one readable line."""
    try:
        with torch.no_grad():
            logits = logits_of(run_model(model, inputs, x))
    except MstCompileError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MstCompileError(f"model() failed on a batch of token ids of shape {tuple(x.shape)}: {type(e).__name__}: {msg}") from None
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise MstCompileError(f"the model returned logits of shape {tuple(logits.shape)} for tokens {tuple(x.shape)}; expected (B, T, vocab)")
    if data.vocab_size and data.vocab_size > logits.size(-1):
        raise MstCompileError(
            f"the data has {data.vocab_size} token ids ({data.source}) but the model predicts only {logits.size(-1)}; "
            "give the model a vocabulary at least that large or use a matching --tokenizer")
