"""Load a user's ``model.py``: it defines ``model()`` and optionally ``example_inputs()``,
``config()``, ``data()`` and ``batch(tokens)``. Every failure is one ``MstCompileError`` naming the
file and the fix. Also what every command expects of the model: how token ids reach it
(``ModelFile.inputs_for``), what it is captured with (``ModelFile.capture_inputs``), and what its
output means (``logits_of``, ``lm_loss``). ``build_model`` builds what ``mstc plan`` takes: a module,
a model file or a Hugging Face config.json."""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CaptureError, ModelInputError, MstCompileError


@dataclass
class ModelFile:
    path: Path
    namespace: Any

    def hook(self, name: str) -> Callable | None:
        fn = getattr(self.namespace, name, None)
        return fn if callable(fn) else None

    def call(self, name: str, *args):
        fn = self.hook(name)
        if fn is None:
            raise MstCompileError(f"{self.path} does not define {name}()")
        try:
            return fn(*args)
        except Exception as e:  # a user's hook failing is reported in one line
            raise MstCompileError(f"{self.path}: {name}() raised {type(e).__name__}: {e}") from e

    def model(self):
        import torch.nn as nn

        m = self.call("model")
        if not isinstance(m, nn.Module):
            raise MstCompileError(f"{self.path}: model() returned {type(m).__name__}, expected a torch.nn.Module")
        return m

    def example_inputs(self):
        return self.call("example_inputs") if self.hook("example_inputs") else None

    def inputs_for(self, model) -> Callable:
        """How the trainer feeds a (B, T) batch of token ids to ``model``: ``tokens -> inputs`` (a tuple
        of positional args or a dict of keyword args, as ``example_inputs()`` returns them).

        The file's ``batch(tokens)`` hook when it has one; else the tokens as the forward's first
        positional argument, or as ``input_ids=`` (the Hugging Face convention). A forward that needs
        any other argument is refused here, in one line that names it.
        """
        if self.hook("batch") is not None:
            return lambda tokens: self.call("batch", tokens)
        name = type(model).__name__
        sig = inspect.signature(model.forward)
        params = list(sig.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        if params and params[0].kind in positional:
            token, pack = params[0].name, lambda tokens: (tokens,)
        elif "input_ids" in sig.parameters:
            token, pack = "input_ids", lambda tokens: {"input_ids": tokens}
        else:
            raise ModelInputError(
                f"{self.path}: {name}.forward takes no positional argument and no input_ids=, so mstc train cannot "
                "pass it token ids; define batch(tokens) in it, returning the forward's inputs for a (B, T) batch of "
                "token ids (a tuple of positional args or a dict of keyword args)")
        needed = [p.name for p in params if p.name != token and p.default is p.empty
                  and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if needed:
            raise ModelInputError(
                f"{self.path}: {name}.forward needs the argument '{needed[0]}', which mstc train cannot supply (it passes "
                f"only the token ids as '{token}'); give it a default, or define batch(tokens) in {self.path.name} returning "
                f"the forward's inputs, e.g. {{'{token}': tokens, '{needed[0]}': ...}} (example_inputs(), if defined, "
                "must return inputs of the same form)")
        return pack

    def capture_inputs(self, model, tokens):
        """What every command captures ``model`` with: the file's ``example_inputs()`` when it defines
        one, else ``tokens`` (a (B, T) batch of token ids) passed as the trainer passes them."""
        if self.hook("example_inputs") is not None:
            return self.example_inputs()
        return self.inputs_for(model)(tokens)

    def capture_error(self, e: CaptureError) -> CaptureError:
        """``e`` with the fix in this file's terms (its hooks) instead of ``sparsify``'s arguments."""
        hook = "example_inputs()" if self.hook("example_inputs") else "batch(tokens)" if self.hook("batch") else None
        given = f"what its {hook} returns" if hook else "token ids as its first argument or input_ids="
        fix = {
            "cache": f"have the forward skip its KV cache: define example_inputs() (and batch(tokens)) in {self.path.name} "
                     "returning e.g. {'input_ids': tokens, 'use_cache': False}",
            "inputs": f"define example_inputs() in {self.path.name}, returning inputs its forward takes "
                      "(a tuple of positional args or a dict of keyword args)",
        }.get(e.kind, f"mstc passed it {given}; make the forward capturable (no Python branching on tensor values), or "
                      f"define example_inputs() in {self.path.name} returning inputs it takes (a tuple or a dict of keyword args)")
        return CaptureError(f"{self.path}: {e.what}; {fix}", e.what, e.kind)

    def config(self):
        from .config import MSTConfig

        if self.hook("config") is None:
            return None
        cfg = self.call("config")
        if isinstance(cfg, dict):
            cfg = MSTConfig.from_dict(cfg)
        if not isinstance(cfg, MSTConfig):
            raise MstCompileError(f"{self.path}: config() returned {type(cfg).__name__}, expected MSTConfig or dict")
        return cfg


def load_model_file(path: str | Path) -> ModelFile:
    """Import ``path`` as a module and check that it defines ``model()``."""
    p = Path(path)
    if not p.is_file():
        raise MstCompileError(f"model file {p} does not exist: pass the path of a .py file that defines model()")
    name = f"_mst_user_model_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise MstCompileError(f"cannot import {p}: expected a Python source file")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(p.resolve().parent))  # let model.py import its neighbours
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise MstCompileError(f"importing {p} raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    mf = ModelFile(p, mod)
    if mf.hook("model") is None:
        raise MstCompileError(f"{p} does not define model(): add `def model(): return MyModel(...)`")
    return mf


def build_model(model):
    """(module, name, inputs(tokens), its model file or None) from a module, a model file (.py) or an HF config (.json)."""
    from torch import nn

    if isinstance(model, nn.Module):
        return model, type(model).__name__, lambda tokens: (tokens,), None
    path = Path(getattr(model, "path", model))
    if path.suffix == ".json":
        if not path.is_file():
            raise MstCompileError(f"HF config {path} does not exist: pass the path of a config.json")
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        except Exception as e:  # noqa: BLE001 - any failure to build is the user's config: one line
            raise MstCompileError(f"cannot build a causal LM from {path}: {type(e).__name__}: {e}") from e
        return hf, str(path), lambda tokens: {"input_ids": tokens}, None
    mf = model if isinstance(model, ModelFile) else load_model_file(path)
    m = mf.model()
    return m, str(mf.path), mf.inputs_for(m), mf


def logits_of(out):
    """A model may return logits, a tuple starting with them, or an output object with ``.logits``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MstCompileError(f"the model returned {type(out).__name__}; expected logits (B, T, vocab) or an output with .logits")


def lm_loss(out, y):
    """Next-token cross entropy of a model's output against the (B, T) targets ``y``."""
    import torch.nn.functional as F

    logits = logits_of(out)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def max_sequence_length(model) -> int | None:
    """The longest sequence ``model`` takes (nanoGPT ``block_size``, HF ``n_positions`` /
    ``max_position_embeddings`` on the model or its config), None when it does not say."""
    for obj in (model, getattr(model, "config", None)):
        for attr in ("block_size", "n_positions", "max_position_embeddings"):
            v = getattr(obj, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def input_embedding(model) -> tuple[str, int] | None:
    """``(name, rows)`` of the embedding the token ids index, found without a forward: the model's
    ``get_input_embeddings()`` (Hugging Face), else its only ``nn.Embedding``, else the only one an
    output layer shares its weight with (a tied head, as in nanoGPT), else the only one that is not a
    position embedding (rows = the maximum sequence length). None when that leaves it open."""
    import torch.nn as nn

    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # a model without one (HF raises the first; a missing base model the second)
        emb = None
    if isinstance(emb, nn.Embedding):
        return names.get(id(emb), "input embedding"), emb.num_embeddings
    embs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    limit = max_sequence_length(model)
    for group in (embs, [e for e in embs if id(e[1].weight) in heads], [e for e in embs if e[1].num_embeddings != limit]):
        if len(group) == 1:
            return group[0][0], group[0][1].num_embeddings
    return None


def parameter_count(model) -> int:
    """Parameters of ``model``, a tensor shared by several modules (a tied head) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_unchanged(path: str | Path, recorded: str | None, run_dir: str | Path) -> None:
    """Warn when the model file differs from the one ``run_dir`` was trained with (its recorded hash)."""
    if recorded and file_sha256(path) != recorded:
        warnings.warn(
            f"the model file {path} changed since the run in {run_dir} was trained with it (sha256 {recorded[:12]}... "
            f"then, {file_sha256(path)[:12]}... now): its checkpoint is loaded into the model the file builds now",
            stacklevel=2)
