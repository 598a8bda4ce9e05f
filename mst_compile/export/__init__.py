"""finalize and ONNX export: fold masks into weights, put plain ops back, write ONNX that
onnxruntime runs with the same outputs as PyTorch (``export_run``: from a training run folder);
Hugging Face folders (``export_hf``, ``export_run_hf``); a run's model back in PyTorch (``load``)."""
from .finalize import finalize
from .hf import export_hf, export_run_hf, read_summary
from .onnx import ExportResult, export_onnx, read_metadata, validate_onnx
from .run import export_run, load

__all__ = ["finalize", "export_onnx", "export_run", "validate_onnx", "read_metadata", "ExportResult", "export_hf",
           "export_run_hf", "read_summary", "load"]
