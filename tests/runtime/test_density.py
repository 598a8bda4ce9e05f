import math

import pytest

from mst_compile.runtime.density import allocate

SHAPES = {"qkv": (384, 128), "proj": (128, 128), "fc": (512, 128), "out": (128, 512), "head": (256, 128), "tiny": (3, 5)}


@pytest.mark.parametrize("dist", ["uniform", "er"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.97, 0.999])
def test_active_count_equals_target_exactly(dist, s):
    counts = allocate(SHAPES, s, dist)
    total = sum(math.prod(v) for v in SHAPES.values())
    assert sum(counts.values()) == round((1 - s) * total)
    assert all(0 <= counts[n] <= math.prod(SHAPES[n]) for n in SHAPES)


def test_er_follows_formula_and_caps_dense_layers():
    counts = allocate(SHAPES, 0.9, "er")
    d = {n: counts[n] / math.prod(SHAPES[n]) for n in SHAPES}
    assert d["tiny"] == 1.0  # (3+5)/15 * eps > 1: made dense, eps solved again over the rest
    eps = d["proj"] / ((128 + 128) / (128 * 128))
    for n in ("qkv", "fc", "out", "head"):
        o, i = SHAPES[n]
        assert d[n] == pytest.approx(eps * (o + i) / (o * i), abs=2 / (o * i))


def test_uniform_is_uniform():
    counts = allocate({"a": (100, 10), "b": (10, 10)}, 0.75, "uniform")
    assert counts == {"a": 250, "b": 25}

