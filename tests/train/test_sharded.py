"""``mstc train --fsdp``: FSDP2 per block against DDP replicas of the same command (same global batch: each rank
reads the same batches in both), a split run against the whole one, the run folder read by export, one rank
without torchrun, and the options it refuses. Two ranks run under torchrun on gloo (tests/_trainer_fsdp_worker.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _torchrun import run_two_ranks
from _train_models import TINY, UNCAPTURABLE, write
from click.testing import CliRunner

import mst_compile
from mst_compile.cli import main
from mst_compile.errors import MstCompileError
from mst_compile.modelfile import load_model_file
from mst_compile.run_folder import load_run_config
from mst_compile.train.loop import TrainingInterrupted, train
from mst_compile.train.metrics import read_jsonl
from mst_compile.train.options import configs_for_model_file
from mst_compile.train.resume import resume_configs

ROOT = Path(__file__).resolve().parents[2]
distributed = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _mask_diff(a: dict, b: dict) -> int:
    ma, mb = a["mst"]["mst"]["masks"], b["mst"]["mst"]["masks"]
    assert ma.keys() == mb.keys()
    return sum(int((ma[n] != mb[n]).sum()) for n in ma)


def _same_state(a: dict, b: dict) -> None:
    """Two checkpoints bit-identical: weights, Adam state, masks, exploration record, growth generator, step."""
    assert a["step"] == b["step"] and a["fingerprint"] == b["fingerprint"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    ma, mb = a["mst"]["mst"], b["mst"]["mst"]
    assert _mask_diff(a, b) == 0 and torch.equal(ma["generator"], mb["generator"]) and ma["step"] == mb["step"]
    assert all(torch.equal(ma["ever_active"][n], mb["ever_active"][n]) for n in ma["masks"])
    assert ma["last_update"] == mb["last_update"]


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]


@distributed
@pytest.mark.torchrun
def test_two_rank_fsdp_run_equals_the_ddp_run_and_exports(tmp_path):
    """``torchrun -m mst_compile train --fsdp`` against the 2-rank DDP run of the same flags (its worker's): the
    same masks after 7 topology updates, validation loss within 1e-4, rank 0 alone writing; the run folder
    loads with mst_compile.load and gives the DDP run's outputs."""
    f = write(tmp_path, "tiny.py", TINY)
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "ddp", "ddp", timeout=300)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mst_compile",
           "train", str(f), "--fsdp", "--steps", "16", "--update-interval", "2", "--out", str(tmp_path / "fsdp"), "--quiet"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done: 16 steps (mst)") == 1
    ddp, fsdp = _summary(tmp_path / "ddp"), _summary(tmp_path / "fsdp")
    assert fsdp["sharding"] == "fsdp2" and fsdp["world_size"] == 2 and ddp["sharding"] == "ddp"
    assert fsdp["ranks_identical"] == {"masks": True, "mst_state": True}
    assert fsdp["tokens"] == ddp["tokens"] == 16 * 4 * 32 * 2
    assert abs(fsdp["val_loss"] - ddp["val_loss"]) <= 1e-4 and abs(fsdp["train_loss"] - ddp["train_loss"]) <= 1e-4
    assert fsdp["final_densities"] == ddp["final_densities"]
    updates = [r for r in read_jsonl(tmp_path / "fsdp" / "metrics.jsonl") if r["kind"] == "update"]
    assert len(updates) >= 2 and updates == [r for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "update"]
    assert _train_steps(tmp_path / "fsdp") == list(range(1, 17))  # one writer
    a, b = _last(tmp_path / "ddp"), _last(tmp_path / "fsdp")
    assert _mask_diff(a, b) == 0 and a["fingerprint"] == b["fingerprint"]
    assert max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]) < 1e-4
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = mst_compile.load(tmp_path / "ddp")(x)
        got = mst_compile.load(tmp_path / "fsdp")(x)
    assert (got - want).abs().max() < 1e-3


HF_TINY = """
import warnings

import mst_compile
from transformers import GPT2Config, GPT2LMHeadModel


def config():
    return mst_compile.MSTConfig(update_interval=4, warmup_end=0.25, ultra_end=0.75, stride=4)


def train_config():
    return {"steps": 24, "batch_size": 4, "block_size": 32, "eval_iters": 2, "eval_interval": 8, "log_interval": 1,
            "checkpoint_interval": 8, "lr": 3e-3}


def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
"""


@distributed
@pytest.mark.torchrun
def test_a_hugging_face_model_trains_under_fsdp_as_under_ddp(tmp_path):
    """A transformers v5 GPT-2 (fx cannot trace it: its blocks are cut from the torch.export graph) under
    ``mstc train --fsdp`` on 2 ranks: the masks and losses of the 2-rank DDP run of the same model file."""
    pytest.importorskip("transformers")
    f = write(tmp_path, "hf.py", HF_TINY)
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "ddp", "ddp", timeout=300)
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "fsdp", "fsdp", timeout=300)
    ddp, fsdp = _summary(tmp_path / "ddp"), _summary(tmp_path / "fsdp")
    assert fsdp["sharding"] == "fsdp2" and fsdp["world_size"] == 2 and fsdp["ranks_identical"] == {"masks": True, "mst_state": True}
    assert abs(fsdp["val_loss"] - ddp["val_loss"]) <= 1e-4 and fsdp["final_densities"] == ddp["final_densities"]
    assert _mask_diff(_last(tmp_path / "ddp"), _last(tmp_path / "fsdp")) == 0


@distributed
@pytest.mark.torchrun
def test_two_rank_fsdp_run_split_in_two_equals_the_whole(tmp_path):
    """The --fsdp run stopped after step 9 (a consolidated checkpoint), resumed from its folder on two ranks (each
    keeps its slices of the whole state): the same checkpoint at step 16 as the uninterrupted run, bit for bit."""
    f = write(tmp_path, "tiny.py", TINY)
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "whole", "fsdp", timeout=300)
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "split", "stop", timeout=300)
    stopped = _last(tmp_path / "split")
    assert stopped["step"] == 9
    shutil.copytree(tmp_path / "split", tmp_path / "one")  # the same checkpoint, resumed on one rank
    run_two_ranks("_trainer_fsdp_worker.py", f, tmp_path / "split", "resume", timeout=300)
    _same_state(_last(tmp_path / "split"), _last(tmp_path / "whole"))
    assert _summary(tmp_path / "split")["val_loss"] == _summary(tmp_path / "whole")["val_loss"]
    assert _train_steps(tmp_path / "split") == list(range(1, 17))
    # the file does not depend on the rank count: one rank takes the whole state (other batches from step 10 on)
    one = train(f, resume=tmp_path / "one", progress=False)
    assert one["world_size"] == 1 and one["sharding"] == "fsdp2" and _last(tmp_path / "one")["step"] == 16
    assert _train_steps(tmp_path / "one") == list(range(1, 17))


def _configs(f: Path, mst: dict | None = None, **train_flags):
    return configs_for_model_file(load_model_file(f), None, {"steps": 12, **train_flags}, {"update_interval": 2, **(mst or {})})


@distributed
def test_fsdp_alone_is_one_rank_equal_to_the_unsharded_run(tmp_path):
    """Without torchrun --fsdp runs as one rank (a process group of one): bit-identical to the unsharded run, and a
    resume may switch to it (the checkpoints are the same files): unsharded to step 5, then --fsdp to the end."""
    f = write(tmp_path, "tiny.py", TINY)
    plain = train(f, *_configs(f), out=tmp_path / "plain", progress=False)
    sharded = train(f, *_configs(f, fsdp=True), out=tmp_path / "fsdp", progress=False)
    assert sharded["sharding"] == "fsdp2" and sharded["world_size"] == 1 and plain["sharding"] == "none"
    assert sharded["val_loss"] == plain["val_loss"]
    _same_state(_last(tmp_path / "fsdp"), _last(tmp_path / "plain"))
    with pytest.raises(TrainingInterrupted):
        train(f, *_configs(f), out=tmp_path / "switch", progress=False, stop_at=5)
    tc, mst, changes = resume_configs(tmp_path / "switch", load_run_config(tmp_path / "switch"), None, {"fsdp": True}, {})
    assert changes == ["--fsdp False -> True"]
    assert train(f, tc, mst, resume=tmp_path / "switch", progress=False)["sharding"] == "fsdp2"
    _same_state(_last(tmp_path / "switch"), _last(tmp_path / "plain"))
    assert not dist.is_initialized()  # the group of one is gone


@distributed
def test_fsdp_alone_with_a_learning_rate_per_weight_is_the_unsharded_run(tmp_path):
    """``lr_density_scope="weight"``: a param group per sparse weight, each at its own density's lr; the sharded
    run's groups hold the same weights (by name) and it ends bit-identical to the unsharded run."""
    f = write(tmp_path, "tiny.py", TINY)
    per_weight = {"warmup_end": 0.0, "lr_density_power": 0.5, "lr_density_scope": "weight"}
    plain = train(f, *_configs(f, per_weight), out=tmp_path / "plain", progress=False)
    sharded = train(f, *_configs(f, per_weight, fsdp=True), out=tmp_path / "fsdp", progress=False)
    assert sharded["sharding"] == "fsdp2" and sharded["val_loss"] == plain["val_loss"]
    _same_state(_last(tmp_path / "fsdp"), _last(tmp_path / "plain"))
    groups = [g.get("mst_weight") for g in _last(tmp_path / "fsdp")["optimizer"]["param_groups"]]
    assert sorted(g for g in groups if g) == sorted(plain["final_densities"])


@distributed
@pytest.mark.parametrize("flags", [{"grad_accum": 2}, {"precision": "bf16"}])
def test_fsdp_alone_with_micro_batches_or_bf16_is_the_unsharded_run(tmp_path, flags):
    """Two micro-batches per step (DDP skips the all-reduce of the first, FSDP2 reduce-scatters and masks both), or
    bf16 autocast: on one rank the --fsdp run is still bit-identical to the unsharded one."""
    f = write(tmp_path, "tiny.py", TINY)
    plain = train(f, *_configs(f, **flags), out=tmp_path / "plain", progress=False)
    sharded = train(f, *_configs(f, **flags, fsdp=True), out=tmp_path / "fsdp", progress=False)
    assert sharded["val_loss"] == plain["val_loss"] and sharded["tokens"] == plain["tokens"]
    _same_state(_last(tmp_path / "fsdp"), _last(tmp_path / "plain"))


@distributed
@pytest.mark.parametrize("flags, says", [
    (["--dense"], "--fsdp with --dense: the dense baseline is captured as one graph"),
    (["--tile", "8"], "--fsdp with --tile 8: tile-structured masks are not supported under FSDP2; drop --tile or --fsdp"),
    (["--precision", "fp16"], "--fsdp with --precision fp16:"),
])
def test_fsdp_refuses_what_it_cannot_run_in_one_line(tmp_path, flags, says):
    f = write(tmp_path, "tiny.py", TINY)
    r = CliRunner().invoke(main, ["train", str(f), "--fsdp", "--out", str(tmp_path / "run"), "--quiet", *flags])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and says in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "run").exists()
    assert not dist.is_initialized()


@distributed
def test_fsdp_refuses_a_model_without_blocks(tmp_path):
    f = write(tmp_path, "unc.py", UNCAPTURABLE)
    with pytest.raises(MstCompileError, match=r"^--fsdp shards the model per block, but blocks='auto' found no nn.ModuleList "
                                              r".* in M: drop --fsdp to train DDP replicas") as e:
        train(f, *_configs(f, fsdp=True), out=tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not dist.is_initialized()
