"""Capture a model as an FX GraphModule that shares parameters with the model.

``torch.fx.symbolic_trace`` first (keeps torch-level ops and module calls); if the model is not
symbolically traceable (data-dependent control flow, Hugging Face ``transformers`` v5), fall back to
``torch.export.export(..., strict=False).module()`` with the batch and sequence dims left dynamic.
Both keep the model's own ``nn.Parameter`` objects, so training the captured module trains the
model in place.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import types
import warnings
from typing import Any

import torch
from torch import nn

from .errors import CaptureError


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Batch and sequence dims of every tensor input are AUTO: dynamic where the model allows it."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {i: auto for i in range(min(x.dim(), 2))}
        return None

    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        else:
            out[name] = spec(value)
    return out


@contextlib.contextmanager
def quiet_torch():
    """Keep torch's own output out of the terminal while capturing: a failed ``torch.export`` prints
    its partial graph to stderr and logs warnings, but the failure is reported as one CaptureError
    line. Warnings raised outside torch (a model's, say) are shown afterwards."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    torch_dir = os.path.dirname(torch.__file__)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("default")
            yield
    finally:
        logger.setLevel(level)
        for w in caught:
            if not str(w.filename).startswith(torch_dir):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def inference(model: nn.Module):
    """Eval mode and, for Hugging Face models, ``use_cache=False`` (a cache object is not a tensor):
    how a model is captured, exported and checked. Both are restored on exit."""
    cfg = getattr(model, "config", None)
    cache = getattr(cfg, "use_cache", None)
    was = model.training
    if cache is not None:
        cfg.use_cache = False
    model.train(False)
    try:
        yield
    finally:
        model.train(was)
        if cache is not None:
            cfg.use_cache = cache


def capture(model: nn.Module, example_inputs: Any = None, *, fx: bool = True) -> tuple[torch.fx.GraphModule, str]:
    """Return ``(graph_module, how)`` with ``how`` in ``{"fx", "export"}`` (``fx=False``: export only).

    An exported module takes its inputs the way ``model`` does (positionally or by keyword), and
    ``gm.meta["example_inputs"]`` holds the inputs it was exported with (see ``_widenings``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    fx_reason = "not tried"
    try:
        if fx:
            return torch.fx.symbolic_trace(model), "fx"
    except Exception as e:  # any tracing failure means "try export"
        fx_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    name = type(model).__name__
    if example_inputs is None:
        what = f"cannot capture {name}: torch.fx.symbolic_trace failed ({fx_reason}) and torch.export needs example inputs"
        raise CaptureError(f"{what}; pass example_inputs=(tensor, ...) or a dict of keyword arguments", what, "inputs")
    args, kwargs = _contiguous(*split_inputs(example_inputs))
    cache = _returned_cache(model, args, kwargs)
    if cache:  # torch.export would fail on it only after tracing the whole model
        what = f"cannot capture {name}: its forward returns a KV cache ({cache}), which is not a tensor"
        raise CaptureError(f"{what}; pass use_cache=False with the example inputs, e.g. example_inputs={{'input_ids': ids, "
                           "'use_cache': False}} (plus 'decoder_input_ids' for encoder-decoder models)", what, "cache")
    _warn_dropout(model)
    was_training = model.training
    with inference(model), quiet_torch():
        for a, k in _widenings(args, kwargs):
            try:
                gm = _export(model, a, k, check=None if a is args and k is kwargs else (args, kwargs))
                break
            except Exception as e:  # a widened example may not suit the model: try the next
                error = e
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            what = (f"cannot capture {name}: torch.fx.symbolic_trace failed ({fx_reason}) and "
                    f"torch.export.export failed ({type(error).__name__}: {first})")
            raise CaptureError(f"{what}; check that example_inputs match the model's forward signature, or pass a "
                               "filter_fn / wrap the model so its forward takes and returns tensors", what, "export") from None
    _share_parameters(model, gm)
    _accept_model_calls(gm, model, a, k)
    gm.meta["example_inputs"] = k or a  # split_inputs' form: a tuple of positional args or a dict
    # torch.export bakes the train/eval mode into the graph, and its module refuses train()/eval();
    # the graph is captured in eval mode, so train()/eval() only set the flag.
    gm.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, mode), gm)
    gm.eval = types.MethodType(lambda self: nn.Module.train(self, False), gm)
    gm.train(was_training)
    return gm, "export"


def _contiguous(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with every tensor contiguous. torch.export turns the example's strides into guards
    on the module's inputs: captured from ``x = t[:, :-1]`` (a strided view, the usual way to cut
    inputs from targets) the module fails on any contiguous batch inside torch's guard code. Exported
    from a contiguous example it runs on contiguous and strided batches alike."""
    def f(x):
        return x.contiguous() if isinstance(x, torch.Tensor) else x

    return tuple(map(f, args)), {n: f(v) for n, v in kwargs.items()}


def _widenings(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """The examples to export with, best first.

    torch.export specialises every dim whose example size is 0 or 1, even under ``Dim.AUTO``: a
    batch-1 example gives a module that only runs at batch 1. So size-0/1 batch and sequence dims are
    first widened to 2 (both dims, then the batch dim only), and the example as given comes last, for
    models whose inputs do not allow that (a length-1 feature dim, say).
    """
    def widen(dims):
        def f(x):
            if not isinstance(x, torch.Tensor):
                return x
            for i in dims:
                if i < x.dim() and x.shape[i] <= 1:
                    x = x.expand(*x.shape[:i], 2, *x.shape[i + 1:]).clone() if x.shape[i] == 1 else \
                        x.new_zeros(*x.shape[:i], 2, *x.shape[i + 1:])
            return x
        return tuple(map(f, args)), {n: f(v) for n, v in kwargs.items()}

    out = [widen((0, 1)), widen((0,))]
    out = [w for i, w in enumerate(out) if not _same_inputs(w, (args, kwargs)) and not any(_same_inputs(w, o) for o in out[:i])]
    return [*out, (args, kwargs)]


def _same_inputs(a, b) -> bool:
    fa, fb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(fa) == len(fb) and all(
        (x.shape == y.shape) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x is y for x, y in zip(fa, fb))


def _export(model: nn.Module, args: tuple, kwargs: dict, check: tuple | None) -> torch.fx.GraphModule:
    """``torch.export`` with batch/sequence dims dynamic; ``check``: inputs the module must also run
    on exactly like ``model`` (the unwidened example)."""
    ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=_dynamic_shapes(model, args, kwargs))
    gm = ep.module()
    if check is not None:
        a, k = check
        with torch.no_grad():
            want, got = model(*a, **k), gm(*a, **k)
        torch.testing.assert_close(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want))
    return gm


def _accept_model_calls(gm: nn.Module, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Let the exported module take its inputs as ``model.forward`` does.

    An exported module accepts exactly the layout it was exported with: captured from
    ``{"input_ids": x}`` it refuses ``gm(x)``, which the model accepts. A pre-hook binds each call to
    the model's signature and passes it on in the captured layout; an argument the graph was not
    captured with is dropped when it equals its default (``attention_mask=None``) and refused otherwise.
    """
    try:
        sig = inspect.signature(model.forward)
        captured = sig.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return  # the example does not bind to the signature: leave torch's own input check in charge
    params = sig.parameters
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name in captured for p in params.values()):
        return
    positional, keywords = list(captured)[: len(args)], list(kwargs)

    def hook(_m, call_args, call_kwargs):
        if len(call_args) == len(positional) and set(call_kwargs) == set(keywords):
            return None  # already in the captured layout
        try:
            got = dict(sig.bind(*call_args, **call_kwargs).arguments)
        except TypeError as e:
            raise TypeError(f"{type(model).__name__}.forward: {e}") from None
        for n, v in got.pop(next((p.name for p in params.values() if p.kind is p.VAR_KEYWORD), ""), {}).items():
            got[n] = v
        def take(n):
            if n in got:
                return got.pop(n)
            if n in params and params[n].default is not params[n].empty:
                return params[n].default
            raise TypeError(f"{type(model).__name__}.forward: missing argument {n!r} (the module was captured with it)")
        new_args, new_kwargs = tuple(take(n) for n in positional), {n: take(n) for n in keywords}
        extra = [n for n, v in got.items() if not (n in params and v is params[n].default)]
        if extra:
            raise TypeError(
                f"{type(model).__name__} was captured with inputs {positional + keywords}; {extra[0]!r} was not among "
                f"them: pass it in example_inputs to capture a graph that takes it")
        return new_args, new_kwargs

    gm.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def _returned_cache(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The class name of a KV cache in the model's eager output (T5 builds one even with config.use_cache=False)."""
    try:
        with torch.no_grad(), inference(model):
            out = model(*args, **kwargs)
    except Exception:  # torch.export reports it with its own context
        return None
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    return next((type(v).__name__ for v in values if type(v).__name__.endswith("Cache")), None)


def _warn_dropout(model: nn.Module) -> None:
    ps = sorted({m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0})
    if ps:
        warnings.warn(
            f"{type(model).__name__} has dropout (p={max(ps)}) but is captured by torch.export, which bakes "
            "eval mode into the graph: it will train without dropout. Set dropout to 0 in the model config "
            "to silence this.",
            stacklevel=3,
        )


def _share_parameters(model: nn.Module, gm: nn.Module) -> None:
    """Make sure every parameter of ``gm`` IS the model's parameter of the same name."""
    own = dict(model.named_parameters(remove_duplicate=False))
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        q = own.get(name)
        if q is not None and q is not p:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            setattr(owner, leaf, q)
