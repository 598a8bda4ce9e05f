"""runtime/sharding.py: FSDP2 in the documented order (sparsify per block, fully_shard on the rewritten blocks, then
on sm, then attach) is accepted; every other sharded layout is refused in one line that names what was seen and
the supported order: FSDP1 and DeepSpeed ZeRO-3 before or after sparsify, FSDP2 before sparsify, fully_shard on a
module that is neither a rewritten block nor sm, blocks without sm, DTensors without FSDP2, a 2-D mesh, tiles, and
a weight replaced after attach.

In one process with a gloo group of one rank; tests/_sharding_worker.py repeats the FSDP cases on two ranks."""
import json

import pytest
import torch
import torch.distributed as dist
from _models import MLP, tiny_gpt
from _torchrun import run_two_ranks

import mst_compile
from mst_compile import MstCompileError
from mst_compile.runtime import sharding

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
ADVICE = ("supported: DDP (sparsify the unsharded model, then wrap sm in DistributedDataParallel) or FSDP2 in this order: "
          "sm = sparsify(model, config, blocks='auto'), fully_shard(block) for each block of sm, fully_shard(sm), "
          "the optimizer over sm.parameters(), sm.mst.attach(optimizer)")


@pytest.fixture
def group(tmp_path):
    """A gloo process group of one rank, for this test only."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def refused(fn, *names) -> str:
    """``fn()`` raises the project's error, in one line that names ``names`` and the supported order."""
    with pytest.raises(MstCompileError) as e:
        fn()
    msg = str(e.value)
    assert type(e.value) is MstCompileError and "\n" not in msg, msg
    assert ADVICE in msg and all(n in msg for n in names), msg
    return msg


def fully_shard(module, **kw):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, **kw)


def fsdp1(module, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(module, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def sparse_mlp():
    return mst_compile.sparsify(MLP(), total_steps=8)


# -- 1, 2: sharded before sparsify ------------------------------------------------------------
def test_fsdp2_before_sparsify(group):
    m = tiny_gpt()
    for block in m.h:
        fully_shard(block)
    fully_shard(m)
    msg = refused(lambda: mst_compile.sparsify(m, total_steps=8), "sparsify: the model (FSDPGPT)", "fully_shard (FSDP2)")
    assert msg.startswith("sparsify: the model (FSDPGPT) was sharded by fully_shard (FSDP2); sparsify the unsharded model; ")
    blocks_only = tiny_gpt()
    fully_shard(blocks_only.h[1])
    refused(lambda: mst_compile.sparsify(blocks_only, total_steps=8), "submodule 'h.1' (FSDPBlock)")


def test_a_dtensor_parameter_without_fsdp(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    m = MLP()
    m.fc2.weight = torch.nn.Parameter(distribute_tensor(m.fc2.weight.detach(), init_device_mesh("cpu", (1,)), [Replicate()]))
    refused(lambda: mst_compile.sparsify(m, total_steps=8), "parameter 'fc2.weight' is a DTensor")


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_before_sparsify(group, use_orig_params):
    refused(lambda: mst_compile.sparsify(fsdp1(MLP(), use_orig_params), total_steps=8),
            "sparsify: the model is a FullyShardedDataParallel wrapper (FSDP1)")


def test_zero3_before_sparsify():
    m = MLP()
    m.fc1.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks a partitioned parameter with (deepspeed is not installed)
    refused(lambda: mst_compile.sparsify(m, total_steps=8), "parameter 'fc1.weight' is partitioned by DeepSpeed ZeRO-3")


# -- 2, 3: sharded after sparsify: the documented FSDP2 order is accepted, the rest refused ----------
def per_block(shard_blocks=True, shard_root=True, **kw):
    """sm of tiny_gpt captured per block, sharded as asked (the documented order: both)."""
    sm = mst_compile.sparsify(tiny_gpt(), total_steps=8, blocks="auto")
    if shard_blocks:
        for block in sm.h:
            fully_shard(block, **kw)
    if shard_root:
        fully_shard(sm, **kw)
    return sm


def test_fsdp2_in_the_documented_order_is_accepted(group):
    """The site table follows the DTensor parameters, the masks become local slices and a step trains."""
    from torch.distributed.tensor import DTensor

    sm = per_block()
    opt = torch.optim.AdamW(sm.parameters())
    sm.mst.attach(opt)
    assert all(isinstance(p, DTensor) and p is sm.get_parameter(n) for n, p in sm.mst.parameters().items())
    sm(torch.randint(0, 64, (2, 8))).square().mean().backward()
    opt.step()
    assert sm.mst.step_count == 1 and sharding.fsdp2_layout(sm, "here")


@pytest.mark.parametrize("opt", [True, False], ids=["attach_optimizer", "attach_none"])
def test_fsdp2_of_sm_alone_is_accepted(group, opt):
    """fully_shard(sm) with no block sharded (a whole-model capture has none) is FSDP2 of the root only."""
    sm = sparse_mlp()
    fully_shard(sm)
    optimizer = torch.optim.SGD(sm.parameters(), lr=0.1) if opt else None
    sm.mst.attach(optimizer)
    sm(torch.randn(4, 16)).square().mean().backward()
    if opt:
        optimizer.step()
    else:
        sm.mst.step()
    assert sm.mst.step_count == 1


def test_fsdp2_on_blocks_of_sm(group):
    """Blocks sharded but sm not: the top-level weights would train unsynchronised."""
    sm = mst_compile.sparsify(tiny_gpt(), total_steps=8, blocks=None)
    fully_shard(sm.get_submodule("h.1"))
    optimizer = torch.optim.AdamW(sm.parameters())
    refused(lambda: sm.mst.attach(optimizer), "sm.mst.attach: submodule 'h.1' (FSDPModule) was sharded by fully_shard "
            "but sm itself was not", "call fully_shard(sm) after the blocks")
    blocks_only = per_block(shard_root=False)
    refused(lambda: blocks_only.mst.attach(None), "submodule 'h.0' (FSDPBlock) was sharded by fully_shard but sm itself was not")


def test_fsdp2_on_a_module_that_is_no_rewritten_block(group):
    whole = mst_compile.sparsify(tiny_gpt(), total_steps=8, blocks=None)  # whole-model capture: h.1 is a plain Module, no block
    fully_shard(whole.get_submodule("h.1"))
    fully_shard(whole)
    refused(lambda: whole.mst.attach(None), "sm.mst.attach: submodule 'h.1' (FSDPModule) was sharded by fully_shard, "
            "but it is neither sm nor a rewritten block (sm was captured whole: blocks=None")
    inner = per_block(shard_blocks=False, shard_root=False)
    fully_shard(inner.get_submodule("h.0.attn"))  # inside a rewritten block
    fully_shard(inner)
    refused(lambda: inner.mst.attach(None), "submodule 'h.0.attn' (FSDPModule) was sharded by fully_shard, but it is "
            "neither sm nor the rewritten blocks h.0 ... h.1")


def test_fsdp2_over_a_2d_mesh_and_tiles_are_refused(group):
    from torch.distributed.device_mesh import init_device_mesh

    hsdp = per_block(mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard")))
    refused(lambda: hsdp.mst.attach(None), "sm.mst.attach: the sparse weight 'h.0.attn.c_attn.weight' is sharded over a "
            "2-D device mesh (HSDP); MST supports FSDP2 over a 1-D mesh only")
    tiled = mst_compile.sparsify(tiny_gpt(), mst_compile.MSTConfig(tile=8), total_steps=8, blocks="auto")
    fully_shard(tiled)
    with pytest.raises(MstCompileError, match=r"tile-structured masks \(MSTConfig.tile=8\) are not supported under FSDP2"):
        tiled.mst.attach(None)


def test_a_dtensor_parameter_after_sparsify_without_fsdp(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    sm = sparse_mlp()
    sm.fc2.weight = torch.nn.Parameter(distribute_tensor(sm.fc2.weight.detach(), init_device_mesh("cpu", (1,)), [Replicate()]))
    refused(lambda: sm.mst.attach(None), "sm.mst.attach: parameter 'fc2.weight' is a DTensor", "without fully_shard")


def test_a_sharded_weight_replaced_after_attach(group):
    """Under FSDP2 the step checks the DTensor parameters attach bound: a replaced one is a stale tensor."""
    sm = per_block()
    sm.mst.attach(None)
    sm.mst.step()
    old = sm.get_parameter("h.0.mlp.0.weight")
    sm.get_submodule("h.0.mlp.0").weight = torch.nn.Parameter(old.detach().clone())
    refused(sm.mst.step, "MST step 2: the sparse weight 'h.0.mlp.0.weight' is no longer the parameter sm registers: it "
            "was replaced after sm.mst.attach")
    assert sm.mst.step_count == 1


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_after_sparsify(group, use_orig_params):
    sm = sparse_mlp()
    wrapped = fsdp1(sm, use_orig_params)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    name = "'fc1.weight'" if use_orig_params else "'_flat_param'"
    refused(lambda: sm.mst.attach(optimizer), f"sm.mst.attach: parameter {name} is flattened by FullyShardedDataParallel (FSDP1)")


def test_sharded_after_attach_is_refused_at_the_next_step(group):
    """attach(None) then sharding: the step would re-mask stale tensors, so it refuses before changing anything."""
    sm = mst_compile.sparsify(tiny_gpt(), total_steps=8, blocks=None)
    sm.mst.attach(None)
    sm.mst.step()
    for block in sm.h.children():  # a GraphModule keeps the hierarchy in plain Modules
        fully_shard(block)
    refused(sm.mst.step, "MST step 2: submodule 'h.0' (FSDPModule) was sharded by fully_shard (FSDP2) after sm.mst.attach")
    assert sm.mst.step_count == 1


def test_zero3_after_sparsify_and_after_attach():
    sm = sparse_mlp()
    sm.fc2.weight.ds_status = "NOT_AVAILABLE"
    refused(lambda: sm.mst.attach(None), "sm.mst.attach: parameter 'fc2.weight' is partitioned by DeepSpeed ZeRO-3")
    sm = sparse_mlp()
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.mst.attach(opt)
    opt.step()
    sm.fc1.weight.ds_id = 3
    refused(opt.step, "MST step 2: parameter 'fc1.weight' is partitioned by DeepSpeed ZeRO-3")


def test_a_weight_replaced_after_sparsify():
    """Whatever replaced it, a sparse weight that sm no longer registers would be masked in vain."""
    sm = sparse_mlp()
    sm.mst.attach(None)
    sm.fc1.weight = torch.nn.Parameter(sm.fc1.weight.detach().clone())
    refused(sm.mst.step, "MST step 1: the sparse weight 'fc1.weight' is no longer the parameter sm registers")


def test_ddp_passes(group):
    """The supported order, sparsify then DistributedDataParallel, in a process group: nothing is refused."""
    from torch.nn.parallel import DistributedDataParallel

    sm = sparse_mlp()
    net = DistributedDataParallel(sm)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sm.mst.attach(opt)
    net(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    assert sm.mst.step_count == 1 and sharding.sharding_seen(net) is None


# -- two ranks: the shards really differ from the weights -------------------------------------
@pytest.mark.torchrun
def test_two_ranks_refuse_every_sharded_setup(tmp_path):
    out = tmp_path / "verdict.json"
    run_two_ranks("_sharding_worker.py", out)
    verdict = json.loads(out.read_text())
    assert sorted(verdict) == ["fsdp1_after", "fsdp1_orig_params_after", "fsdp2_after", "fsdp2_before", "fsdp2_documented"]
    assert verdict.pop("fsdp2_documented") == ["no error", "no error"]
    for case, (first, second) in verdict.items():
        assert first == second and first.startswith("MstCompileError: ") and ADVICE in first, (case, first, second)
