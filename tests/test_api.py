"""api.sparsify: the config forms it takes, the module it returns (the user's parameters, the user's
outputs while dense), filter_fn, the handle's inventory of what it rewrote and skipped, and bad arguments."""
import pytest
import torch
from _models import MLP, NoLinear, TiedLM

import mst_compile
from mst_compile import MSTConfig


def test_config_forms():
    torch.manual_seed(0)
    assert mst_compile.sparsify(MLP()).mst.config == MSTConfig()
    assert mst_compile.sparsify(MLP(), {"sparsity": 0.7}).mst.config == MSTConfig(sparsity=0.7)
    cfg = MSTConfig(sparsity=0.6)
    sm = mst_compile.sparsify(MLP(), cfg, total_steps=40)
    assert sm.mst.config is cfg and sm.mst.schedule.total_steps == 40
    with pytest.raises(TypeError, match="config must be an MSTConfig, a dict or None, got int"):
        mst_compile.sparsify(MLP(), 3)


def test_the_module_shares_the_models_parameters_and_outputs():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 16)
    sm = mst_compile.sparsify(model)
    torch.testing.assert_close(sm(x), model(x), rtol=0, atol=0)  # every weight starts dense
    assert {id(p) for p in sm.parameters()} == {id(p) for p in model.parameters()}
    assert sm.mst.capture == "fx" and sm.mst.skipped == []
    assert sorted(sm.mst.parameters()) == ["fc1.weight", "fc2.weight"]
    sm.mst.set_sparsity(0.5)
    assert model.fc1.weight.eq(0).float().mean() > 0.3  # training sm trains (and prunes) model in place


def test_filter_fn_keeps_weights_dense():
    sm = mst_compile.sparsify(MLP(), filter_fn=lambda module, fqn: fqn != "fc2")
    assert list(sm.mst.parameters()) == ["fc1.weight"]
    with pytest.raises(TypeError, match=r"filter_fn must be callable as filter_fn\(module, fqn\) -> bool, got str"):
        mst_compile.sparsify(MLP(), filter_fn="fc2")


def test_a_tied_head_is_one_site_used_by_the_lookup_too():
    torch.manual_seed(0)
    sm = mst_compile.sparsify(TiedLM())
    sites = {e.name: e for e in sm.mst.sites}
    assert set(sites) == {"proj.weight", "emb.weight"}  # named by the tensor's first owner
    assert sum(e.params for e in sites.values()) == 16 * 16 + 50 * 16  # the tied tensor counted once


def test_bad_arguments():
    with pytest.raises(TypeError, match="sparsify expects a torch.nn.Module, got function"):
        mst_compile.sparsify(lambda x: x)
    with pytest.warns(UserWarning):
        sm = mst_compile.sparsify(NoLinear())  # nothing to sparsify: said, not an error
    assert sm.mst.sites == []


def test_a_model_on_the_meta_device_is_refused_in_one_line():
    """Meta-device init (build on meta, shard, materialize) comes after sparsify, never before: the
    allocation counts mask values a meta tensor does not have."""
    with torch.device("meta"):
        model = MLP()
    with pytest.raises(mst_compile.MstCompileError, match=r"^sparsify: 'fc1.weight' of MLP is on the meta device; "
                       r"materialize the model first \(model.to_empty\(device=...\) and its weight init\)") as e:
        mst_compile.sparsify(model)
    assert "\n" not in str(e.value)
