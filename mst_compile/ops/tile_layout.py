"""Tile-structured masks: the b×b tile grid of a weight and the index lists the tile kernels read.

A weight of shape (R, C) is cut into a grid of ⌈R/b⌉ × ⌈C/b⌉ tiles from its top-left corner; where b
does not divide a dimension the last row or column of tiles is smaller (an edge tile). A tile mask is
a bool tensor of the grid's shape; the element mask the runtime keeps is that mask expanded, so
every mask is constant on each tile. The grid is the same whichever way a weight is used: tiles are
square and start at the corner, so the tiles of Wᵀ are the transposed tiles of W.

``TileLayout`` lists the active tiles of one mask twice, the way the kernels walk them (int32):

    row_ptr (n_rows + 1,), cols (n,)     tiles by row of the grid (CSR order): row r holds
                                         cols[row_ptr[r]:row_ptr[r+1]]; rows (n,) is the row of each
    col_ptr (n_cols + 1,), rows_t (n,)   the same tiles by column (CSC order), for the input gradient;
                                         cols_t (n,) is the column of each

y = x Wᵀ walks the rows (each program owns a row of output tiles), dx = dy W the columns, and the
weight gradient the list of (rows, cols). For a weight used transposed (stored (in, out)) the roles of
the two orders swap, so one layout serves both uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def grid(shape: tuple[int, ...], tile: int) -> tuple[int, int]:
    """(tile rows, tile columns) of a weight of ``shape``: ⌈R/b⌉ × ⌈C/b⌉."""
    return math.ceil(shape[0] / tile), math.ceil(shape[1] / tile)


def n_tiles(shape: tuple[int, ...], tile: int) -> int:
    rows, cols = grid(shape, tile)
    return rows * cols


def tile_sums(t: Tensor, tile: int) -> Tensor:
    """Sum of ``t`` (R, C) over each tile: (⌈R/b⌉, ⌈C/b⌉); edge tiles sum what they hold."""
    R, C = t.shape
    nr, nc = grid(t.shape, tile)
    padded = F.pad(t, (0, nc * tile - C, 0, nr * tile - R))  # zeros add nothing
    return padded.reshape(nr, tile, nc, tile).sum((1, 3))


def tile_norms(t: Tensor, tile: int) -> Tensor:
    """L2 norm of each tile of ``t`` (R, C) in fp32: (⌈R/b⌉, ⌈C/b⌉). inf/NaN stay inf/NaN."""
    return tile_sums(t.detach().float().square(), tile).sqrt()


def to_tiles(mask: Tensor, tile: int) -> Tensor:
    """The tile mask of an element mask: True where a tile holds any active weight."""
    return tile_sums(mask.float(), tile) > 0


def expand(tile_mask: Tensor, shape: tuple[int, ...], tile: int) -> Tensor:
    """The element mask (R, C) of a tile mask: every weight takes its tile's value."""
    R, C = shape[0], shape[1]
    return tile_mask.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:R, :C].contiguous()


def is_tile_constant(mask: Tensor, tile: int) -> bool:
    """True when every b×b tile (edge tiles included) of ``mask`` is all on or all off."""
    on = tile_sums(mask.float(), tile)
    area = tile_sums(torch.ones((), device=mask.device).expand(mask.shape), tile)
    return bool(((on == 0) | (on == area)).all())


def not_tiled_message(name: str, mask: Tensor, tile: int) -> str:
    """One line for a mask that is not constant on the tiles of ``name``."""
    return (f"the mask of weight '{name}' (shape {tuple(mask.shape)}) is not constant on {tile}x{tile} tiles; "
            f"with MSTConfig.tile={tile} every mask must be (use masks made under the same tile, or tile=None)")


class TileLayout:
    """The active tiles of one (stored) mask, in row and in column order (see the module docstring)."""

    def __init__(self, mask: Tensor, tile: int):
        self.tile = tile
        self.shape = tuple(mask.shape)
        self.grid = grid(self.shape, tile)
        tm = to_tiles(mask, tile)  # (n_rows, n_cols)
        self.n = int(tm.sum())
        dev = mask.device

        def ordered(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            r, c = m.nonzero(as_tuple=True)  # row-major order
            ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int32, device=dev)
            ptr[1:] = torch.cumsum(torch.bincount(r, minlength=m.shape[0]), 0)
            return ptr, c.to(torch.int32), r.to(torch.int32)

        self.row_ptr, self.cols, self.rows = ordered(tm)
        self.col_ptr, self.rows_t, self.cols_t = ordered(tm.t())  # cols_t: the column of each tile in column order

    def to(self, device: torch.device) -> TileLayout:
        for k in ("row_ptr", "cols", "rows", "col_ptr", "rows_t", "cols_t"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def for_use(self, transposed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(row_ptr, cols, rows, col_ptr, rows_t) of the weight as used: W, or Wᵀ of a weight stored (in, out)."""
        if transposed:  # the rows of Wᵀ are the columns of W
            return self.col_ptr, self.rows_t, self.cols_t, self.row_ptr, self.cols
        return self.row_ptr, self.cols, self.rows, self.col_ptr, self.rows_t
