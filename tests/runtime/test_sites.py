"""runtime/sites.py: the site table's cached densities, keep_largest against a magnitude sort (by weight
and by tile), apply_masks, and the checks a checkpoint's masks must pass."""
import pytest
import torch
from torch import nn

from mst_compile.errors import CheckpointError
from mst_compile.ops.sparse_linear import SparseWeight
from mst_compile.ops.tile_layout import expand, grid
from mst_compile.runtime.sites import WeightSite, apply_masks, check_masks, keep_largest, overall_density, units


def _sites(tile=None):
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in (("a", (6, 8)), ("b", (5, 3))):
        p = nn.Parameter(torch.randn(shape, generator=g))
        sw = SparseWeight(name, p)
        sw.use_tiles(tile)
        out[name] = WeightSite(name, p, sw)
    return out


def test_keep_largest_keeps_the_top_magnitudes_and_caches_densities():
    sites = _sites()
    before = {n: s.param.detach().clone() for n, s in sites.items()}
    keep_largest(sites, {"a": 10, "b": 4}, "dense")
    for n, k in (("a", 10), ("b", 4)):
        s = sites[n]
        top = set(before[n].abs().flatten().topk(k).indices.tolist())
        assert set(s.mask.flatten().nonzero().flatten().tolist()) == top  # the k largest |w|
        assert s.density == pytest.approx(k / s.param.numel()) == s.active() / s.param.numel()
        assert torch.equal(s.param.detach(), before[n] * s.mask)
    assert overall_density(sites) == pytest.approx(14 / (48 + 15))
    assert units(sites) == {"a": 48, "b": 15}
    keep_largest(sites, {"b": 0}, "dense")
    assert sites["b"].active() == 0 and sites["b"].density == 0.0 and sites["a"].active() == 10


def test_keep_largest_by_tile_ranks_tiles_by_l2_norm():
    sites = _sites(tile=2)
    w = sites["a"].param.detach().clone()
    keep_largest(sites, {"a": 3}, "dense")
    R, C = w.shape
    norms = {(r, c): w[2 * r:2 * r + 2, 2 * c:2 * c + 2].norm().item() for r in range(R // 2) for c in range(C // 2)}
    best = sorted(norms, key=norms.get)[-3:]
    tm = torch.zeros(grid((R, C), 2), dtype=torch.bool)
    for rc in best:
        tm[rc] = True
    assert torch.equal(sites["a"].mask, expand(tm, (R, C), 2))
    assert sites["a"].active_units() == 3 and units(sites) == {"a": 12, "b": 6}  # b: 3x2 tiles, edge tiles too


def test_apply_masks_zeroes_what_the_masks_drop():
    sites = _sites()
    keep_largest(sites, {"a": 5, "b": 5}, "dense")
    with torch.no_grad():
        for s in sites.values():
            s.param.add_(1.0)  # an optimizer step writes everywhere
    apply_masks(sites)
    for s in sites.values():
        assert torch.all(s.param.detach()[~s.mask] == 0) and torch.all(s.param.detach()[s.mask] != 0)
    apply_masks({})  # no sites: nothing to do


def test_check_masks_names_what_does_not_fit():
    sites = _sites()
    good = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in sites.items()}
    check_masks(sites, good)
    with pytest.raises(CheckpointError, match="must be a dict of name -> bool tensor, got list"):
        check_masks(sites, [])
    with pytest.raises(CheckpointError, match=r"missing masks for \['b'\], masks for weights the model does not have: \['c'\]"):
        check_masks(sites, {"a": good["a"], "c": good["b"]})
    with pytest.raises(CheckpointError, match=r"the mask of weight 'b' has shape \(3, 5\) in the checkpoint, but the model's "
                                              r"weight has shape \(5, 3\)"):
        check_masks(sites, {**good, "b": torch.ones(3, 5, dtype=torch.bool)})
    tiled = _sites(tile=2)
    ragged = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in tiled.items()}
    ragged["a"][0, 0] = False
    with pytest.raises(CheckpointError, match=r"the mask of weight 'a' .* is not constant on 2x2 tiles"):
        check_masks(tiled, ragged)
