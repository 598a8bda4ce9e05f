"""ops/tile_layout.py: the tile grid, tile sums and masks against loops over the tiles, and TileLayout's
row and column orders against the active tiles listed by hand."""
import math

import pytest
import torch

from mst_compile.ops.tile_layout import TileLayout, expand, grid, is_tile_constant, n_tiles, not_tiled_message, tile_norms, tile_sums, to_tiles

SHAPES = [(8, 8), (10, 7), (3, 5), (16, 4)]


def _tiles(shape, b):
    """(r, c, slice) of every tile, edge tiles smaller: the reference the module's pads and reshapes must match."""
    R, C = shape
    for r in range(math.ceil(R / b)):
        for c in range(math.ceil(C / b)):
            yield r, c, (slice(r * b, min(R, (r + 1) * b)), slice(c * b, min(C, (c + 1) * b)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("b", [1, 2, 4])
def test_grid_sums_and_norms_match_a_loop_over_tiles(shape, b):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert grid(shape, b) == (-(-shape[0] // b), -(-shape[1] // b)) and n_tiles(shape, b) == math.prod(grid(shape, b))
    sums, norms = tile_sums(t, b), tile_norms(t, b)
    assert sums.shape == grid(shape, b)
    for r, c, sl in _tiles(shape, b):
        assert sums[r, c].item() == pytest.approx(t[sl].sum().item(), abs=1e-5)
        assert norms[r, c].item() == pytest.approx(t[sl].norm().item(), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_tile_masks_expand_and_reduce(shape):
    b = 3
    g = torch.Generator().manual_seed(1)
    tm = torch.rand(grid(shape, b), generator=g) < 0.5
    m = expand(tm, shape, b)
    assert m.shape == shape and m.dtype == torch.bool
    for r, c, sl in _tiles(shape, b):
        assert bool(m[sl].all()) if tm[r, c] else not bool(m[sl].any())
    assert torch.equal(to_tiles(m, b), tm) and is_tile_constant(m, b)
    elem = torch.zeros(shape, dtype=torch.bool)
    elem[shape[0] - 1, shape[1] - 1] = True  # one weight in the corner edge tile
    assert not is_tile_constant(elem, b) or shape[0] % b == 1 and shape[1] % b == 1
    assert to_tiles(elem, b).sum() == 1 and to_tiles(elem, b)[-1, -1]


def test_layout_lists_active_tiles_by_row_and_by_column():
    tm = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    lay = TileLayout(expand(tm, (6, 5), 2), 2)  # a 3x3 grid with a narrow last column
    assert lay.grid == (3, 3) and lay.n == 4 and lay.shape == (6, 5)
    active = [(r, c) for r in range(3) for c in range(3) if tm[r, c]]
    assert lay.row_ptr.tolist() == [0, 2, 2, 4] and lay.cols.tolist() == [c for _, c in active]
    assert lay.rows.tolist() == [r for r, _ in active]
    by_col = sorted(active, key=lambda rc: (rc[1], rc[0]))
    assert lay.col_ptr.tolist() == [0, 2, 3, 4] and lay.rows_t.tolist() == [r for r, _ in by_col]
    assert lay.cols_t.tolist() == [c for _, c in by_col]
    assert all(t.dtype == torch.int32 for t in lay.for_use(False))
    row_ptr, cols, rows, col_ptr, rows_t = lay.for_use(True)  # Wᵀ: its rows are W's columns
    assert torch.equal(row_ptr, lay.col_ptr) and torch.equal(cols, lay.rows_t) and torch.equal(rows, lay.cols_t)
    assert torch.equal(col_ptr, lay.row_ptr) and torch.equal(rows_t, lay.cols)
    assert lay.to(torch.device("cpu")).device.type == "cpu"


def test_the_not_tiled_message_names_weight_shape_and_tile():
    msg = not_tiled_message("fc1.weight", torch.ones(4, 6, dtype=torch.bool), 2)
    assert "'fc1.weight'" in msg and "(4, 6)" in msg and "2x2 tiles" in msg and "tile=None" in msg
