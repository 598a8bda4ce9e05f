import dataclasses

import pytest

from mst_compile import Ablation, MSTConfig
from mst_compile.errors import MstCompileError
from mst_compile.train.loop import lr_at
from mst_compile.train.options import TrainConfig, build_configs, dumps_config, parse_flag, read_config_file


def test_precedence_hooks_then_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.002\n[train]\nbatch_size = 8\nsteps = 40\n[mst]\nsparsity = 0.8\nattention_phases = ["ultra", "restoration"]\n')
    hook_mst = MSTConfig(sparsity=0.7, update_interval=25, ablation=Ablation(restoration_shape="linear"))
    tc, mst = build_configs(hook_mst, {"batch_size": 2, "eval_iters": 3, "seed": 4}, str(f), {"batch_size": 4},
                            {"final_sparsity": 0.3, "ablation": {"grow_init_scale": 0.5}})
    assert (tc.batch_size, tc.eval_iters, tc.lr, tc.steps, tc.seed) == (4, 3, 0.002, 40, 4)
    assert (mst.sparsity, mst.final_sparsity, mst.update_interval) == (0.8, 0.3, 25)
    assert mst.ablation == Ablation(grow_init_scale=0.5, restoration_shape="linear")  # merged key by key
    assert mst.attention_phases == ("ultra", "restoration")


def test_run_length_and_seed_live_in_train_only(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[mst]\ntotal_steps = 77\n")
    with pytest.raises(MstCompileError, match=r"\[mst\] total_steps is no longer accepted: .*\[train\] steps"):
        read_config_file(f)
    f.write_text("[mst]\ngrow_init_scale = 0.5\n")
    with pytest.raises(MstCompileError, match=r"\[mst\] grow_init_scale is no longer accepted: .*\[mst.ablation\] grow_init_scale"):
        read_config_file(f)
    f.write_text("[mst.ablation]\nrestoration_shape = \"early\"\ngrow = 1\n")
    with pytest.raises(MstCompileError, match=r"unknown key\(s\) \['grow'\] in \[mst.ablation\]"):
        read_config_file(f)


def test_saved_config_reads_back_identically(tmp_path):
    tc, mst = build_configs(None, None, None, {"steps": 60, "lr": 3e-4, "data": "some dir/x*.txt"},
                            {"schedule": [(0, 0.0), (30, 0.9), (60, 0.5)], "drop_fraction": (0.3, 0.2, 0.1), "stride": 8,
                             "ablation": {"attention_restore": "widen"}})
    tc = tc.resolved(mst, 64)
    p = tmp_path / "config.toml"
    p.write_text(dumps_config(tc, mst, "examples/tiny_gpt.py"))
    assert '[mst.ablation]\ngrow_init_scale = 0.0\nattention_restore = "widen"' in p.read_text()
    train, m = read_config_file(p)
    tc2, mst2 = build_configs(None, train, None, {}, m)
    assert tc2 == tc
    assert mst2 == mst


def test_unknown_keys_and_bad_files_are_readable(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nbatchsize = 8\n")
    with pytest.raises(MstCompileError, match=r"unknown key\(s\) \['batchsize'\] in \[train\]"):
        read_config_file(f)
    f.write_text("spars = 0.5\n")
    with pytest.raises(MstCompileError, match="unknown key 'spars'"):
        read_config_file(f)
    f.write_text("[mst\n")
    with pytest.raises(MstCompileError, match="not valid TOML"):
        read_config_file(f)
    with pytest.raises(MstCompileError, match="does not exist"):
        read_config_file(tmp_path / "none.toml")
    f.write_text("[mst]\nsparsity = 1.5\n")
    with pytest.raises(ValueError, match=r"MSTConfig.sparsity=1.5 is invalid"):
        build_configs(None, None, str(f), {}, {})


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("lr", 0.0), ("grad_accum", 1.5), ("device", "tpu"),
                                         ("val_fraction", 1.0), ("min_lr", 5.0), ("warmup_steps", -1), ("data_dtype", "float32"),
                                         ("text_field", "")])
def test_train_config_validates(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}="):
        TrainConfig(**{field: value})


def test_resolved_fills_every_default():
    tc = TrainConfig(steps=200, lr=1e-3).resolved(MSTConfig(), model_block_size=None)
    # the data options stay None: what they default to depends on the form of the data (README: Data)
    assert all(getattr(tc, f.name) is not None for f in dataclasses.fields(tc) if f.name not in ("data", "tokenizer", "data_dtype", "text_field"))
    assert (tc.steps, tc.block_size, tc.min_lr, tc.warmup_steps, tc.eval_interval, tc.checkpoint_interval) == (200, 128, 1e-4, 10, 40, 40)
    assert (tc.lr_schedule, tc.lr_decay) == ("wsd", 0.2)  # the WSD decay spans MST's restoration phase
    assert TrainConfig().resolved(MSTConfig(ultra_end=0.7)).lr_decay == 0.3
    assert TrainConfig().resolved(MSTConfig(warmup_end=0.0, ultra_end=1.0)).lr_decay == 0.2  # no restoration: the stated tail


def test_flag_parsing():
    assert parse_flag("schedule", "0:0,10:0.9,20:0.5") == [(0, 0.0), (10, 0.9), (20, 0.5)]
    assert parse_flag("attention_phases", "warmup, ultra") == ("warmup", "ultra")
    assert parse_flag("stride", "auto") is None and parse_flag("stride", "16") == 16
    assert parse_flag("drop_fraction", "0") == 0.0 and parse_flag("drop_fraction", "0.3,0.3,0.1") == (0.3, 0.3, 0.1)
    with pytest.raises(ValueError, match="--schedule 'x' is invalid"):
        parse_flag("schedule", "x")


def test_lr_schedule_warms_up_then_decays_to_min():
    tc = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    mst = MSTConfig()
    lrs = [lr_at(s, tc, mst) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear ramp up to the peak
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: never increases
    assert lrs[55] == pytest.approx(0.55, abs=1e-9)  # halfway through the decay: (lr + min_lr)/2
    assert lr_at(100, tc, mst) == pytest.approx(0.1)



def test_ablation_flags_fill_the_group():
    from mst_compile.train.options import split_flags

    kw = {"mst__ablation__restoration_shape": "early", "mst__drop_fraction": "0", "train__lr": None, "other": 1}
    train, mst = split_flags(kw)
    assert mst == {"ablation": {"restoration_shape": "early"}, "drop_fraction": 0.0} and train == {} and kw == {"other": 1}
