"""Exceptions raised by mst_compile. Every error names the object, what was expected and what to do."""


class MstCompileError(Exception):
    """Base class of every error mst_compile raises on purpose."""


class CaptureError(MstCompileError):
    """Neither torch.fx nor torch.export could capture the model.

    ``what`` says what failed and ``kind`` why ("inputs": no example inputs for torch.export,
    "cache": the forward returns a KV cache, "export": torch.export failed); the message adds the
    fix in Python API terms, and ``ModelFile.capture_error`` words it for a model file instead.
    """

    def __init__(self, message: str, what: str = "", kind: str = ""):
        super().__init__(message)
        self.what, self.kind = what or message, kind


class ModelInputError(MstCompileError):
    """A model's forward needs inputs that the trainer cannot supply from token ids alone."""


class CheckpointError(MstCompileError):
    """A checkpoint or MST state does not fit the model it is loaded into."""


class ExportValidationError(MstCompileError):
    """onnxruntime and PyTorch disagree on an exported model's outputs."""

    def __init__(self, message: str, diffs: dict | None = None):
        super().__init__(message)
        self.diffs = dict(diffs or {})
