"""errors.py: one base class for every deliberate error, and the extra fields two of them carry."""
import pytest

from mst_compile import errors


@pytest.mark.parametrize("cls", [errors.CaptureError, errors.ModelInputError, errors.CheckpointError,
                                 errors.ExportValidationError])
def test_every_error_is_caught_by_the_base_class(cls):
    with pytest.raises(errors.MstCompileError, match="one line"):
        raise cls("one line")


def test_capture_error_says_what_failed_and_why():
    e = errors.CaptureError("torch.export failed: boom; pass example_inputs", what="torch.export failed: boom", kind="export")
    assert (str(e), e.what, e.kind) == ("torch.export failed: boom; pass example_inputs", "torch.export failed: boom", "export")
    bare = errors.CaptureError("no inputs")
    assert bare.what == "no inputs" and bare.kind == ""  # the message stands in for what


def test_export_validation_error_keeps_its_own_copy_of_the_diffs():
    diffs = {"logits": 0.5}
    e = errors.ExportValidationError("mismatch", diffs)
    diffs["logits"] = 0.0
    assert e.diffs == {"logits": 0.5} and errors.ExportValidationError("x").diffs == {}
