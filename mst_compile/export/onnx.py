"""export_onnx: finalize, export with torch.onnx (dynamo), store sparse weights sparsely, record
metadata, and check the file in onnxruntime against PyTorch.

Pipeline:

    sm ──finalize──▶ plain GraphModule ──wrap (tensors in, tensors out)──▶ torch.onnx.export(dynamo=True)
       ──optimize (weights kept as named initializers)──▶ sparse_initializer (COO) ──▶ metadata ──▶ save
       ──▶ onnxruntime vs PyTorch at two (batch, seq) shapes

Why the exporter's own optimizer is not used as is: it folds ``Transpose(weight)`` of small weights
into new initializers, which renames them and doubles a tied weight (the embedding and the
transposed ``lm_head``). Here constant folding skips every node that reads a weight, so each
parameter is ONE initializer named like the parameter; onnxruntime folds the transposes at load.

Sparse attention patterns are traced as the opaque op ``mst_export::hsa`` and translated by
``attention_onnx.hsa_onnx`` (same blocked computation in ONNX ops): torch.export would otherwise
spend seconds of symbolic shape algebra on every attention site.
"""
from __future__ import annotations

import inspect
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .. import __version__
from ..capture import inference
from ..errors import MstCompileError
from ..modelfile import max_sequence_length as model_limit
from ..paths import writable_file
from .finalize import finalize, is_sparsified, pinned, resolve_attention
from .validate import check_length_limit, compare

PREFIX = "mst_compile."  # metadata_props keys
_WRAPPED = "model"  # attribute of the wrapper holding the model: initializer names start with "model."


def _import_onnx():
    try:
        import importlib

        import onnx

        importlib.import_module("onnxscript")  # torch.onnx's dynamo exporter needs it
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): pip install 'mst-compile[onnx]'"
        ) from e
    return onnx


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the file, its size, its metadata and the validation outcome."""

    path: Path
    size: int  # bytes on disk
    metadata: dict[str, Any]  # decoded metadata_props (keys without the "mst_compile." prefix)
    sparse_initializers: list = field(default_factory=list)  # SparseEntry per weight stored as COO
    max_diff: dict[str, float] | None = None  # per output, None when not validated
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


# -- inputs and outputs ----------------------------------------------------------------------
@dataclass
class ModelInputs:
    """The example tensors in the order the ONNX inputs take them, their names, and how the model takes them."""

    names: list[str]
    examples: list[torch.Tensor]
    as_kwargs: bool


def model_inputs(model: nn.Module, example_inputs: Any) -> ModelInputs:
    """Name and order the example tensors; they become the ONNX inputs."""
    if example_inputs is None:
        raise ValueError("export_onnx needs example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors")
    if isinstance(example_inputs, dict):
        names, values, kw = list(example_inputs), list(example_inputs.values()), True
    else:
        values = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
        names, kw = _arg_names(model, len(values)), False
    bad = [n for n, v in zip(names, values) if not isinstance(v, torch.Tensor)]
    if bad or not values:
        raise ValueError(f"example_inputs must be tensors (got non-tensors for {bad or 'nothing'}); fixed options belong in the model")
    return ModelInputs(names, values, kw)


def _arg_names(model: nn.Module, count: int) -> list[str]:
    if isinstance(model, fx.GraphModule):
        names = [n.target.lstrip("*") for n in model.graph.nodes if n.op == "placeholder"]
    else:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = names[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _tensors(out) -> list[torch.Tensor]:
    """A model's output as a flat tensor list: HF outputs give their logits."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return [logits]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _output_names(model: nn.Module, io: ModelInputs) -> list[str]:
    with torch.no_grad():
        out = call_model(model, io, io.examples)
    n = len(_tensors(out))
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return ["logits"]
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def call_model(model: nn.Module, io: ModelInputs, xs):
    """Run ``model`` on the tensors ``xs`` laid out as ``io`` names them (keywords or positions)."""
    return model(**dict(zip(io.names, xs))) if io.as_kwargs else model(*xs)


class _Outputs(nn.Module):
    """Tensors in, tensors out: what torch.onnx exports (HF models return ModelOutput objects)."""

    def __init__(self, model: nn.Module, io: ModelInputs):
        super().__init__()
        setattr(self, _WRAPPED, model)
        self.io = io

    def forward(self, *xs):
        return tuple(_tensors(call_model(getattr(self, _WRAPPED), self.io, xs)))


def _dynamic_shapes(io: ModelInputs) -> tuple:
    """Batch (dim 0) of every input; sequence (dim 1) of token ids and of (B, T, ...) float inputs."""
    dyn = torch.export.Dim.DYNAMIC
    specs = []
    for x in io.examples:
        spec = {0: dyn} if x.dim() >= 1 else {}
        if x.dim() >= 3 or (x.dim() == 2 and not x.dtype.is_floating_point):
            spec[1] = dyn
        specs.append(spec)
    return (tuple(specs),)  # the wrapper's forward takes *xs


def _traceable(io: ModelInputs, dynamic) -> list[torch.Tensor]:
    """Example tensors with every dynamic dim at least 2 (torch.export specializes sizes 0 and 1)."""
    out = []
    for x, spec in zip(io.examples, dynamic[0]):
        for d in spec:
            if x.shape[d] == 1:
                x = torch.cat([x, x], d)
        out.append(x)
    return out


# -- the PyTorch side of validation ---------------------------------------------------------
def reference(model: nn.Module, example_inputs: Any, attention: str | dict | None = None):
    """The PyTorch side of a check: ``fn(*tensors) -> [outputs]`` running ``model`` as exported."""
    io = model_inputs(model, example_inputs)
    chosen = resolve_attention(model, attention) if is_sparsified(model) else {}

    def run(*xs):
        with inference(model), pinned(model, chosen), torch.no_grad():
            return _tensors(call_model(model, io, xs))

    return run, io


# -- metadata ---------------------------------------------------------------------------------
def model_metadata(model: nn.Module, chosen: dict, extra: dict | None) -> dict[str, Any]:
    """What an export records about ``model``: version, densities, the ``chosen`` attention, config, ``extra``."""
    if is_sparsified(model):
        h = model.mst
        meta = {
            "version": __version__,
            "densities": h.densities(),
            "density": h.density(),
            "attention": {n: p for n, (p, _) in chosen.items()},
            "stride": {n: "T/8" if s is None else s for n, (_, s) in chosen.items()},
            "config": h.config.to_dict(),
        }
    else:  # a plain model: every matrix's share of nonzeros
        mats = {n: p for n, p in model.named_parameters() if p.dim() == 2}
        nz = {n: int(torch.count_nonzero(p)) for n, p in mats.items()}
        total = sum(p.numel() for p in mats.values())
        meta = {
            "version": __version__,
            "densities": {n: nz[n] / p.numel() for n, p in mats.items()},
            "density": sum(nz.values()) / total if total else 1.0,
            "attention": "as written in the model",
            "stride": None,
        }
    meta.update(extra or {})
    return meta


def read_metadata(path) -> dict[str, Any]:
    """The ``mst_compile.*`` metadata_props of an ONNX file, decoded (keys without the prefix)."""
    onnx = _import_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return {p.key[len(PREFIX):]: json.loads(p.value) for p in model.metadata_props if p.key.startswith(PREFIX)}


# -- export -----------------------------------------------------------------------------------
def export_onnx(
    sm_or_model: nn.Module,
    path,
    example_inputs: Any,
    *,
    attention: str | dict | None = None,
    sparse_initializers: bool = True,
    validate: bool = True,
    provider: str = "cpu",
    atol: float = 1e-4,
    metadata: dict[str, Any] | None = None,
    max_sequence_length: int | None = None,
    check_lengths: list[int] | tuple[int, ...] = (),
) -> ExportResult:
    """Write ``sm_or_model`` to ``path`` as ONNX with dynamic batch and sequence axes.

    ``sm_or_model``: the module returned by ``mst_compile.sparsify`` (finalized first: masks folded,
    plain ops, attention as ``attention`` says) or any plain model (the user's own model keeps the
    sparse weights). ``sparse_initializers`` stores weights below 50% density as COO sparse
    initializers. ``validate`` runs onnxruntime on ``provider`` against PyTorch at two sequence
    lengths and raises ``ExportValidationError`` when an output differs by more than ``atol``.
    ``metadata`` adds JSON-serializable entries to the file's ``mst_compile.*`` metadata_props.
    ``max_sequence_length`` (default: the model's ``block_size`` / ``n_positions`` /
    ``max_position_embeddings`` where it has one) is recorded as ``max_sequence_length``; the
    validation also runs every sequence length of ``check_lengths``, none of which may exceed it.
    The file is written to ``path`` only once it validated: a failed validation leaves ``path`` as it was.
    """
    onnx = _import_onnx()
    from .sparse_init import to_sparse_initializers
    from .validate import check_provider

    if validate:
        check_provider(provider)  # onnxruntime (and the provider) missing: fail before the slow part
    if not isinstance(sm_or_model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(sm_or_model).__name__}")
    path = writable_file(path, "export path")  # before the export's work
    limit = max_sequence_length or (None if is_sparsified(sm_or_model) else model_limit(sm_or_model))
    check_length_limit(check_lengths, limit, "the model")
    sparse = is_sparsified(sm_or_model)
    if not sparse and attention is not None:
        raise ValueError(
            f"attention={attention!r} needs the module returned by mst_compile.sparsify; a plain "
            f"{type(sm_or_model).__name__} is exported with the attention it is written with"
        )
    chosen = resolve_attention(sm_or_model, attention) if sparse else {}
    module = finalize(sm_or_model, attention=attention) if sparse else sm_or_model
    io = model_inputs(module, example_inputs)
    meta = {**model_metadata(sm_or_model, chosen, metadata), "max_sequence_length": limit}

    label = "the finalized sparsified module" if sparse else type(sm_or_model).__name__
    proto = _export(module, io, onnx, label)
    stored = to_sparse_initializers(proto) if sparse_initializers else []
    meta["sparse_initializers"] = [e.name for e in stored]
    for key, value in meta.items():
        proto.metadata_props.add(key=PREFIX + key, value=json.dumps(value, default=str))
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # becomes ``path`` once it validates: a failed file is not left
    try:
        onnx.save(proto, str(partial))
        max_diff = None
        if validate:
            run, ref_io = reference(sm_or_model, example_inputs, attention)
            max_diff = compare(partial, run, ref_io.examples, provider=provider, atol=atol, lengths=check_lengths,
                               shown=str(path))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(path, path.stat().st_size, json.loads(json.dumps(meta, default=str)), stored, max_diff,
                        inputs=[i.name for i in proto.graph.input], outputs=[o.name for o in proto.graph.output])


def _export(module: nn.Module, io: ModelInputs, onnx, label: str):
    """torch.onnx.export (dynamo) of the wrapped module, optimized, names cleaned: a ModelProto."""
    import onnx_ir as ir
    import onnxscript

    from .attention import as_op, hsa_op
    from .attention_onnx import hsa_onnx

    wrapper = _Outputs(module, io)
    dynamic = _dynamic_shapes(io)
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with inference(module), as_op(), warnings.catch_warnings():
            # the exporter's own notices (torch, onnxscript, onnx_ir internals), not the user's code's warnings
            warnings.filterwarnings("ignore", module=r"(torch|onnxscript|onnx_ir|onnx)(\.|$)")
            warnings.filterwarnings("ignore", message=r"Exporting a model while it is in training mode")  # export runs in eval
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
            outputs = _output_names(module, io)
            program = torch.onnx.export(
                wrapper, tuple(_traceable(io, dynamic)), dynamo=True, optimize=False, verbose=False,
                input_names=io.names, output_names=outputs, dynamic_shapes=dynamic,
                custom_translation_table={hsa_op._opoverload: hsa_onnx},
            )
    except Exception as e:  # one readable line instead of the exporter's trace
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()][:3]
        raise MstCompileError(
            f"torch.onnx.export could not export {label}: {type(e).__name__}: {' / '.join(lines)}"
        ) from None
    finally:
        quiet.setLevel(level)
    model = program.model
    onnxscript.optimizer.optimize_ir(model, should_fold=_keep_weights)
    for v in list(model.graph.initializers.values()):
        if v.name.startswith(_WRAPPED + "."):
            v.name = v.name[len(_WRAPPED) + 1:]
    proto = ir.serde.serialize_model(model)
    for node in proto.graph.node:  # the exporter's per-node debug notes (stack traces) outweigh small models
        del node.metadata_props[:]
    _name_axes(proto)
    return proto


def _keep_weights(node) -> bool | None:
    """Constant folding: never fold a node that reads a weight (False), decide as usual otherwise."""
    for v in node.inputs:
        if v is not None and v.is_initializer() and v.shape is not None and len(v.shape) >= 2:
            return False
    return None


def _name_axes(proto) -> None:
    """Call the symbolic batch and sequence dims ``batch`` and ``sequence`` everywhere they appear."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[i].dim_param: label for i, label in ((0, "batch"), (1, "sequence")) if len(dims) > i and dims[i].dim_param}
    for vi in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]


def validate_onnx(path, model: nn.Module, example_inputs: Any, *, attention: str | dict | None = None,
                  provider: str = "cpu", atol: float = 1e-4, seed: int = 0,
                  lengths: list[int] | tuple[int, ...] = ()) -> dict[str, float]:
    """Compare an ONNX file with ``model`` (run with the exported ``attention``) on fresh inputs.

    ``lengths`` adds sequence lengths to check (each at most the file's ``max_sequence_length``).
    Returns the max |difference| per output; raises ``ExportValidationError`` past ``atol``.
    """
    run, io = reference(model, example_inputs, attention)
    return compare(path, run, io.examples, provider=provider, atol=atol, seed=seed, lengths=lengths)
