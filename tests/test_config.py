import pytest

from mst_compile import Ablation, MSTConfig
from mst_compile.runtime.schedule import Schedule


def test_defaults_match_design():
    c = MSTConfig()  # docs/design.md §3 and §8
    assert (c.sparsity, c.final_sparsity, c.warmup_end, c.ultra_end) == (0.85, 0.5, 0.0, 0.8)
    assert (c.lr_density_power, c.lr_density_scope, c.attention_depth) == (0.5, "run", 0.5)
    assert (c.update_interval, c.grow_gradient_fraction) == (None, 0.75)
    assert Schedule(c, 1000).interval == 33  # derived without a warm-up: T // 30
    assert Schedule(c.replace(warmup_end=0.1), 1000).interval == 19  # five updates inside a 100-step warm-up
    assert c.drop_fraction == (0.3, 0.3, 0.0)  # restoration drops nothing
    assert MSTConfig(drop_fraction=0.2).drop_fraction == (0.2, 0.2, 0.0)  # one number: warm-up and ultra
    assert c.ablation == Ablation() and c.ablation.restoration_shape == "late"
    assert c.attention_phases == ("warmup", "ultra", "restoration")


def test_round_trip():
    c = MSTConfig(sparsity=0.8, schedule=[(0, 0.0), (10, 0.5)], drop_fraction=(0.1, 0.2, 0.3),
                  attention_phases=("ultra", "restoration"), stride=16, ablation=Ablation(attention_restore="widen"))
    d = c.to_dict()
    assert MSTConfig.from_dict(d) == c
    import json

    assert MSTConfig.from_dict(json.loads(json.dumps(d))) == c


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("sparsity", 1.0, "[0, 1)"),
        ("sparsity", -0.1, "[0, 1)"),
        ("distribution", "gaussian", "uniform, er"),
        ("distribution", "erk", "use distribution='er'"),
        ("drop_fraction", (0.3, 0.3), "three numbers in [0, 1]"),
        ("update_interval", 0, ">= 1"),
        ("attention", "banded", "dense, local, strided, sparse"),
        ("stride", 0, ">= 1"),
        ("attention_phases", ("middle",), "phase names"),
        ("grow_gradient_fraction", 1.5, "[0, 1]"),
        ("sparse_kernel", "gpu", "auto, dense, csr"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, words):
    with pytest.raises(ValueError) as e:
        MSTConfig(**{field: value})
    msg = str(e.value)
    assert f"MSTConfig.{field}={value!r}" in msg and words in msg


def test_phase_fractions_must_fit():
    with pytest.raises(ValueError, match="ultra_end"):
        MSTConfig(warmup_end=0.6, ultra_end=0.5)


def test_unknown_keys_rejected():
    with pytest.raises(ValueError, match="unknown keys \\['sparsity_max'\\]"):
        MSTConfig.from_dict({"sparsity_max": 0.9})


def test_config_is_frozen_and_replace_validates():
    import dataclasses

    cfg = MSTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 2  # would bypass validation
    assert cfg.replace(sparsity=0.9).sparsity == 0.9 and cfg.sparsity == 0.85
    with pytest.raises(ValueError, match=r"MSTConfig.sparsity=2 is invalid"):
        cfg.replace(sparsity=2)
    with pytest.raises(ValueError, match=r"Ablation.grow_init_scale=-1 is invalid"):
        cfg.replace(ablation=Ablation(grow_init_scale=-1))


@pytest.mark.parametrize("old,new", [("total_steps", "sparsify(model, config, total_steps=...)"),
                                     ("seed", "sparsify(model, config, seed=...)"),
                                     ("drop_fractions", "drop_fraction=(warmup, ultra, restoration)"),
                                     ("grow_init_scale", "ablation=Ablation(grow_init_scale=...)"),
                                     ("restoration_shape", "ablation=Ablation(restoration_shape=...)"),
                                     ("attention_restore", "ablation=Ablation(attention_restore=...)"),
                                     ("extra", "only the recipe")])
def test_removed_keywords_name_the_new_spelling(old, new):
    for make in (lambda: MSTConfig(**{old: 1}), lambda: MSTConfig().replace(**{old: 1}), lambda: MSTConfig.from_dict({old: 1})):
        with pytest.raises(TypeError) as e:
            make()
        assert str(e.value).startswith(f"MSTConfig({old}=...) is no longer accepted") and new in str(e.value)
        assert "\n" not in str(e.value)
