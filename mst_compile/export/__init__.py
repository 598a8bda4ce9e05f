"""finalize and ONNX export: fold masks into weights, put plain ops back, write ONNX that
onnxruntime runs with the same outputs as PyTorch."""
from .finalize import finalize
from .onnx import ExportResult, export_onnx, read_metadata, validate_onnx

__all__ = ["finalize", "export_onnx", "validate_onnx", "read_metadata", "ExportResult"]
