"""mst_compile: Mixed Sparsity Training as a compiler pass over PyTorch models.

Importing the package is cheap: torch is imported only when a verb that needs it is first used.
"""
from __future__ import annotations

from .config import Ablation, MSTConfig
from .errors import CaptureError, CheckpointError, ExportValidationError, MstCompileError

__version__ = "0.1.0"
__all__ = [
    "Ablation",
    "MSTConfig",
    "sparsify",
    "finalize",
    "export_onnx",
    "plan",
    "load",
    "MstCompileError",
    "CaptureError",
    "CheckpointError",
    "ExportValidationError",
    "__version__",
]

_LAZY = {"sparsify": ("api", "sparsify"), "finalize": ("export", "finalize"), "export_onnx": ("export", "export_onnx"),
         "plan": ("planning", "plan"), "load": ("export", "load")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mst_compile' has no attribute {name!r}")
