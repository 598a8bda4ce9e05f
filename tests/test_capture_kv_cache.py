"""A model whose forward returns a KV cache (T5) fails capture with a message that says use_cache=False."""
import warnings

import pytest
import torch

from mst_compile.capture import capture
from mst_compile.errors import CaptureError

transformers = pytest.importorskip("transformers")


def tiny_t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5_with_its_cache_says_use_cache_false():
    model, ids = tiny_t5(), torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CaptureError) as e:
            capture(model, {"input_ids": ids, "decoder_input_ids": ids})
    msg = str(e.value)
    assert "use_cache=False" in msg and "EncoderDecoderCache" in msg and "\n" not in msg


@pytest.mark.slow
def test_t5_with_use_cache_false_captures():
    """The advice works: the captured module computes the model's logits."""
    model, ids = tiny_t5(), torch.randint(0, 64, (2, 8))
    ex = {"input_ids": ids, "decoder_input_ids": ids, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, how = capture(model, ex)
    assert how == "export"
    with torch.no_grad():
        torch.testing.assert_close(gm(**ex).logits, model(**ex).logits)
