"""run_config: TrainConfig's checks, config.toml in and out, and run folders written in an older spelling."""
import pytest
import tomllib

from mst_compile.config import Ablation, MSTConfig
from mst_compile.errors import MstCompileError
from mst_compile.run_config import TrainConfig, dumps_config, read_config_file


def _write(tmp_path, text):
    f = tmp_path / "c.toml"
    f.write_text(text)
    return f


def test_a_written_config_reads_back_as_the_same_run(tmp_path):
    tc = TrainConfig(steps=40, batch_size=8, lr=3e-3, seed=5, lr_schedule="cosine")
    mc = MSTConfig(sparsity=0.8, drop_fraction=(0.2, 0.1, 0.0), ablation=Ablation(restoration_shape="linear"))
    text = dumps_config(tc, mc, model="m.py", model_sha256="ab")
    tomllib.loads(text)  # valid TOML, checked by the standard library's reader
    train, mst = read_config_file(_write(tmp_path, text))
    assert TrainConfig(**train) == tc and MSTConfig.from_dict(mst) == mc


def test_top_level_keys_go_to_whichever_table_knows_them(tmp_path):
    train, mst = read_config_file(_write(tmp_path, "steps = 7\nsparsity = 0.7\n[mst]\nupdate_interval = 3\n"))
    assert train == {"steps": 7} and mst == {"sparsity": 0.7, "update_interval": 3}


@pytest.mark.parametrize("text, words", [
    ("[mst]\ntotal_steps = 10\n", "[mst] total_steps is no longer accepted: the run length is passed once"),
    ("[mst]\ndrop_fractions = [0.3, 0.3, 0.0]\n", "[mst] drop_fractions is no longer accepted: use drop_fraction="),
    ("[mst]\nsparsty = 0.9\n", "unknown key(s) ['sparsty'] in [mst]"),
    ("[mst.ablation]\nshape = 1\n", "unknown key(s) ['shape'] in [mst.ablation]"),
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("steps = \n", "is not valid TOML"),
])
def test_bad_files_are_one_line_naming_the_key(tmp_path, text, words):
    with pytest.raises(MstCompileError) as e:
        read_config_file(_write(tmp_path, text))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MstCompileError, match="does not exist"):
        read_config_file(tmp_path / "nope.toml")


def test_a_run_folders_record_in_the_old_spelling_reads_in_todays_keys(tmp_path):
    """What mstc wrote before the recipe/ablation split: [mst] repeated the run's steps and seed, held the
    ablation switches and, when set, the per-phase drop_fractions. Keys it predates read as the values that run
    trained with (the defaults of then: a dense warm-up, the LR curve as is, HSA at every site), not today's."""
    old = ('model = "m.py"\n[train]\nsteps = 60\nseed = 2\n[mst]\ntotal_steps = 60\nseed = 2\nsparsity = 0.8\n'
           'drop_fraction = 0.3\ndrop_fractions = [0.2, 0.2, 0.1]\ngrow_init_scale = 0.0\nrestoration_shape = "early"\n')
    train, mst = read_config_file(_write(tmp_path, old))
    assert train == {"steps": 60, "seed": 2}
    assert MSTConfig.from_dict(mst) == MSTConfig(sparsity=0.8, drop_fraction=(0.2, 0.2, 0.1),
                                                 ablation=Ablation(grow_init_scale=0.0, restoration_shape="early"),
                                                 warmup_end=0.1, lr_density_power=0.0, attention_depth=1.0)
    assert MSTConfig().replace(warmup_end=0.1, lr_density_power=0.0, attention_depth=1.0) != MSTConfig()


def test_a_record_written_today_reads_back_as_written(tmp_path):
    """The fill-in for old records never touches a record that names every key (what mstc writes now)."""
    for cfg in (MSTConfig(), MSTConfig(warmup_end=0.3, lr_density_power=1.0, attention_depth=0.25)):
        text = 'model = "m.py"\n' + dumps_config(TrainConfig(steps=60), cfg)
        assert MSTConfig.from_dict(read_config_file(_write(tmp_path, text))[1]) == cfg


def test_old_keys_in_a_hand_written_file_are_still_refused(tmp_path):
    """Only a run folder's own record (it names its model) is read in the old spelling; a user's file is told the new one."""
    with pytest.raises(MstCompileError, match="seed is no longer accepted"):
        read_config_file(_write(tmp_path, "[mst]\nseed = 2\n"))


def test_train_config_checks_each_field_on_construction():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
