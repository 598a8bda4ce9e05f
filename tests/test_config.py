import pytest

from mst_compile import MSTConfig


def test_defaults_match_design():
    c = MSTConfig()  # docs/design.md §3 and §8
    assert (c.sparsity, c.final_sparsity, c.warmup_end, c.ultra_end) == (0.85, 0.5, 0.1, 0.8)
    assert (c.update_interval, c.drop_fraction, c.grow_gradient_fraction) == (None, 0.3, 0.75)
    assert c.interval == 19  # derived: five updates inside the 100-step warm-up
    assert c.phase_drop_fractions == (0.3, 0.3, 0.0)  # restoration drops nothing
    assert c.attention_phases == ("warmup", "ultra", "restoration")


def test_round_trip():
    c = MSTConfig(total_steps=77, sparsity=0.8, schedule=[(0, 0.0), (10, 0.5)], drop_fractions=(0.1, 0.2, 0.3),
                  attention_phases=("ultra", "restoration"), stride=16)
    d = c.to_dict()
    assert MSTConfig.from_dict(d) == c
    import json

    assert MSTConfig.from_dict(json.loads(json.dumps(d))) == c


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("sparsity", 1.0, "[0, 1)"),
        ("sparsity", -0.1, "[0, 1)"),
        ("total_steps", 0, "> 0"),
        ("distribution", "gaussian", "uniform, er, erk"),
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
    with pytest.raises(ValueError, match=r"MSTConfig.total_steps=0 is invalid"):
        dataclasses.replace(cfg, total_steps=0)
