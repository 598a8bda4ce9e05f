"""Run an exported ONNX model in onnxruntime and compare it with PyTorch on fresh random inputs.

Inputs are drawn like the example inputs (same dtype; integers in the example's [min, max] range,
floats with its spread) at two shapes: the example's batch and sequence length, then one more
sequence and a longer batch, so the dynamic axes are exercised, then any extra ``lengths`` asked
for. Any output further than ``atol`` from PyTorch raises ``ExportValidationError`` listing every
output's max difference. A length beyond the ``max_sequence_length`` the export recorded is refused
in one line before anything runs (onnxruntime would only report a broadcast failure deep inside).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..errors import ExportValidationError, MstCompileError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def import_onnxruntime():
    """``onnxruntime``, or an ImportError that names the extra to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "validating an ONNX export needs onnxruntime, which is not installed: "
            "pip install 'mst-compile[onnx]' (or 'mst-compile[gpu]' for onnxruntime-gpu), or pass validate=False"
        ) from e
    return onnxruntime


def check_provider(provider: str) -> str:
    """The onnxruntime execution provider for ``cpu`` / ``cuda``; says clearly when it is missing."""
    ort = import_onnxruntime()
    if provider not in PROVIDERS:
        raise ValueError(f"provider={provider!r} is invalid: expected one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise MstCompileError(
            f"onnxruntime has no {name} here (available: {', '.join(available)}): "
            + ("install onnxruntime-gpu (pip install 'mst-compile[gpu]') in place of onnxruntime, or use provider 'cpu'"
               if provider == "cuda" else "reinstall onnxruntime")
        )
    return name


def session(path, provider: str = "cpu"):
    """An onnxruntime session for ``path`` on ``provider`` (``cpu`` or ``cuda``)."""
    name = check_provider(provider)
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=list(dict.fromkeys([name, PROVIDERS["cpu"]])))
    if name not in sess.get_providers():  # onnxruntime falls back to CPU when the CUDA libraries fail to load
        raise MstCompileError(f"onnxruntime could not start {name} (check the CUDA and cuDNN libraries onnxruntime-gpu needs)")
    return sess


def random_like(example: torch.Tensor, batch: int, seq: int | None, gen: torch.Generator) -> torch.Tensor:
    """A fresh tensor like ``example`` with dim 0 = ``batch`` and (when given) dim 1 = ``seq``."""
    shape = list(example.shape)
    if shape:
        shape[0] = batch
    if seq is not None and len(shape) >= 2:
        shape[1] = seq
    if example.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=example.device)
    if not example.dtype.is_floating_point:
        lo, hi = (int(example.min()), int(example.max())) if example.numel() else (0, 1)
        return torch.randint(lo, hi + 1, shape, generator=gen).to(example.dtype).to(example.device)
    std = float(example.float().std()) if example.numel() > 1 else 1.0
    return (torch.randn(shape, generator=gen) * (std or 1.0)).to(example.dtype).to(example.device)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def validation_shapes(batch: int, seq: int | None, lengths=()) -> list[tuple[int, int | None]]:
    """(batch, seq) pairs to check: the example's own, a shorter (or longer) sequence and batch + 1, ``lengths``."""
    if seq is None:
        return [(batch, None), (batch + 1, None)]
    other = seq // 2 + 1 if seq >= 3 else seq + 1
    return list(dict.fromkeys([(batch, seq), (batch + 1, other), *((batch, t) for t in lengths)]))


def check_length_limit(lengths, limit: int | None, what: str) -> None:
    """Refuse sequence lengths that are not positive or exceed ``limit`` (``what`` names its source)."""
    bad = [t for t in lengths if isinstance(t, bool) or not isinstance(t, int) or t < 1]
    if bad:
        raise ValueError(f"sequence lengths to check must be integers >= 1, got {bad}")
    over = [t for t in lengths if limit is not None and t > limit]
    if over:
        raise MstCompileError(f"sequence length {max(over)} is beyond the maximum sequence length {limit} of {what} "
                              f"(its block size / position embeddings); check lengths up to {limit}")


def probe_limit(runs: Callable[[int], bool], start: int, cap: int) -> int | None:
    """The longest length T <= ``cap`` with ``runs(T)``, for a model that runs at ``start`` but names no
    limit; None when it ran at every length probed. Tries start + 1 first (positions that end at the
    training length), then doubles up to ``cap``, then bisects between the last length that ran and
    the first that did not."""
    good, bad, T = start, None, start + 1
    while bad is None and T <= cap:
        if runs(T):
            good, T = T, (cap if T < cap < 2 * T else 2 * T)
        else:
            bad = T
    if bad is None:
        return None
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if runs(mid) else (good, mid)
    return good


def recorded_limit(sess) -> int | None:
    """The ``mst_compile.max_sequence_length`` an export recorded in its metadata, if any."""
    raw = sess.get_modelmeta().custom_metadata_map.get("mst_compile.max_sequence_length")
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, int) else None


def compare(
    path,
    reference: Callable[..., list[torch.Tensor]],
    examples: list[torch.Tensor],
    *,
    provider: str = "cpu",
    atol: float = 1e-4,
    seed: int = 0,
    lengths: list[int] | tuple[int, ...] = (),
    shown: str | None = None,
) -> dict[str, float]:
    """Max |onnxruntime − PyTorch| per output of ``path`` over the validation shapes; raises past ``atol``.

    ``reference(*inputs)`` is the PyTorch side, returning the outputs in the ONNX file's order;
    ``examples`` are the example tensors in the ONNX file's input order; ``lengths`` are extra
    sequence lengths to check at the example's batch size. ``shown`` names the file in messages.
    """
    shown = shown or str(path)
    sess = session(path, provider)
    check_length_limit(lengths, recorded_limit(sess), shown)
    ins, outs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    if len(ins) != len(examples):
        raise MstCompileError(f"{shown} has {len(ins)} inputs ({[i.name for i in ins]}) but {len(examples)} example inputs were given")
    # an axis is dynamic when the file names it instead of fixing it
    seq_dynamic = [len(i.shape) >= 2 and not isinstance(i.shape[1], int) for i in ins]
    lead = examples[0]
    batch = lead.shape[0] if lead.dim() else 1
    seq = lead.shape[1] if seq_dynamic[0] else None
    if lengths and seq is None:
        raise MstCompileError(f"{shown} has no dynamic sequence axis on its first input: sequence lengths cannot be checked")
    diffs = {n: 0.0 for n in outs}
    gen = torch.Generator().manual_seed(seed)
    shapes = validation_shapes(batch, seq, lengths)
    for b, t in shapes:
        inputs = [random_like(x, b, t if dyn else None, gen) for x, dyn in zip(examples, seq_dynamic)]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = [y.detach().float().cpu().numpy() for y in reference(*inputs)]
        except Exception as e:  # the model itself does not run at this shape: one line, not torch's trace
            raise ExportValidationError(f"PyTorch could not run the model at batch={b}, seq={t}: {_first_line(e)}",
                                        {n: float("nan") for n in outs}) from None
        try:
            got = sess.run(outs, {i.name: x.cpu().numpy() for i, x in zip(ins, inputs)})
        except Exception as e:  # onnxruntime's own error types; one line is enough
            raise ExportValidationError(f"onnxruntime could not run {shown} at batch={b}, seq={t}: {_first_line(e)}",
                                        {n: float("nan") for n in outs}) from None
        for name, e, g in zip(outs, expected, got):
            if e.shape != g.shape:
                raise ExportValidationError(
                    f"{shown}: output {name!r} has shape {g.shape} in onnxruntime but {e.shape} in PyTorch "
                    f"at batch={b}, seq={t}",
                    {name: float("inf")},
                )
            d = float(np.max(np.abs(e - g.astype(np.float32)))) if e.size else 0.0
            if np.isnan(d) or d > diffs[name]:  # a NaN stays: max() would drop it
                diffs[name] = d
    bad = sorted(n for n, d in diffs.items() if not d <= atol)  # NaN counts as bad
    if bad:
        listing = ", ".join(f"{n}: {d:.3g}" for n, d in diffs.items())
        raise ExportValidationError(
            f"{shown}: onnxruntime ({provider}) and PyTorch disagree beyond atol={atol:g} on {bad} "
            f"(max |difference| per output: {listing}; shapes checked (batch, seq): {shapes})",
            diffs,
        )
    return diffs
