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
    guards = _guard_embeddings(model, x, data)
    try:
        with torch.no_grad():
            logits = logits_of(run_model(model, inputs, x))
    except MstCompileError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MstCompileError(f"model() failed on a batch of token ids of shape {tuple(x.shape)}: {type(e).__name__}: {msg}") from None
    finally:
        for g in guards:
            g.remove()
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise MstCompileError(f"the model returned logits of shape {tuple(logits.shape)} for tokens {tuple(x.shape)}; expected (B, T, vocab)")
    ids = data.id_range()
    if ids is not None and ids[1] >= logits.size(-1):
        raise MstCompileError(
            f"the data's largest token id is {ids[1]} ({data.origin()}) but the model predicts only {logits.size(-1)} classes; "
            f"give the model a vocabulary of at least {ids[1] + 1} or use a matching --tokenizer")


def embedding_too_small(ids_said: str, largest: int, name: str, rows: int) -> MstCompileError:
    """The one line for token ids beyond the input embedding; ``ids_said`` names the largest id and its origin."""
    return MstCompileError(f"{ids_said} but the model's input embedding {name} has {rows} rows (ids 0-{rows - 1}); give the "
                           f"model a vocabulary of at least {largest + 1}, or use data or a --tokenizer whose ids fit")


def _guard_embeddings(model, x, data) -> list:
    """Hooks that refuse, before the lookup, token ids an embedding fed with ``x`` has no row for: the
    vocabulary check of an embedding that setup could not identify without a forward."""
    ptr = x.untyped_storage().data_ptr()
    names = {id(m): n for n, m in model.named_modules()}

    def guard(emb, args):
        idx = args[0] if args else None
        if not (isinstance(idx, torch.Tensor) and idx.numel() and idx.untyped_storage().data_ptr() == ptr):
            return  # not the token ids (position ids, a batch(tokens) hook's own tensors)
        ids = data.id_range()
        hi = ids[1] if ids else int(idx.max())
        said = f"the data's largest token id is {hi}" if ids else f"the first batch holds token id {hi}"
        if hi >= emb.num_embeddings:
            raise embedding_too_small(f"{said} ({data.origin()})", hi, names[id(emb)], emb.num_embeddings)

    return [m.register_forward_pre_hook(guard) for m in model.modules() if isinstance(m, torch.nn.Embedding)]
