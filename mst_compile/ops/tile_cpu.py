"""The blocked CPU kernels of tile-structured weights (fp32), built on first use.

``ops/csrc/tile_cpu.cpp`` makes one BLAS call per active tile, on the tile where it lies in the dense
weight: ``mm`` (y = x Wᵀ; with Wᵀ and the column order, dx = dy W) and ``sddmm`` (the weight gradient
on the active tiles only). Measured against the alternatives on one thread of the 2-core AVX2 CPU
(768x3072 and 3072x768 weights, 1024 tokens, tile density 0.1, fwd + bwd against dense):

    tile   python loop of addmm on views   bmm over gathered tiles   this kernel
    16     0.97-1.23x                      0.37-0.67x                2.2-3.5x
    32     2.56-4.52x                      1.09-1.53x                3.9-6.3x
    64     5.73-7.39x                      2.41-3.74x                5.5-8.2x

(gathering the activations of every active tile costs as much memory traffic as the GEMMs save;
the Python loop pays ~10 µs per tile call). It is compiled with ``torch.utils.cpp_extension`` into
the torch extensions cache once per environment (``kernel_build``); when it cannot be built,
``sparse_kernel="auto"`` keeps the masked-dense path and says so once.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import kernel_build

_SOURCE_FILE = Path(__file__).parent / "csrc" / "tile_cpu.cpp"  # shipped as package data (pyproject.toml)
_state: dict = {}


def available() -> bool:
    """Build (once per environment) and load the kernel; False, with one warning, when it cannot be had."""
    if "ok" not in _state:
        _state["ok"] = False
        try:
            kernel_build.load_extension("mst_tile", _SOURCE_FILE)
            _state["ok"] = True
        except Exception as e:  # no compiler, no ninja, a build lock held too long: masked dense still works
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            warnings.warn(f"mst_compile: the blocked CPU tile kernel is not available ({_state['error']}); tile-structured "
                          "weights run on the masked-dense path", stacklevel=2)
    return _state["ok"]


def why_unavailable() -> str:
    return _state.get("error", "it was not built")


def mm(x: Tensor, w: Tensor, ptr: Tensor, idx: Tensor, tile: int) -> Tensor:
    """y (N, out) = x (N, in) @ wᵀ over the active tiles of w (out, in), walked by rows of the grid."""
    return torch.ops.mst_tile.mm(x, w, ptr, idx, tile)


def sddmm(gy: Tensor, x: Tensor, rows: Tensor, cols: Tensor, tile: int) -> Tensor:
    """(out, in) = gyᵀ @ x on the tiles (rows[i], cols[i]), zero elsewhere."""
    return torch.ops.mst_tile.sddmm(gy, x, rows, cols, tile)


if __name__ == "__main__":  # build ahead of time, e.g. right after installing
    print("blocked CPU tile kernel:", "ready" if available() else f"not available ({why_unavailable()})")
