"""The measured CPU crossovers of the sparse kernels: the density below which a kernel beats the
masked-dense op (forward + backward), so ``sparse_kernel="auto"`` takes it there.

They live in ``kernel_crossovers.json`` (package data) with where they were measured:
``benchmarks/csr_kernels.py --package`` writes the CSR entry, ``benchmarks/tiles.py --package`` the
blocked tile kernel's (per tile edge); each is the lowest break-even density measured, so a kernel is
only taken where it was never measured slower. The file is read once, at the first kernel choice.
"""
from __future__ import annotations

import functools
import json
from importlib import resources


@functools.cache
def kernel_crossovers() -> dict:
    """The whole file: per kernel ("csr", "tile") its density and provenance."""
    return json.loads(resources.files(__package__).joinpath("kernel_crossovers.json").read_text())


def csr_crossover() -> float:
    """Density below which the CSR path beats the masked-dense op on CPU."""
    return kernel_crossovers()["csr"]["density"]


def tile_crossover(tile: int) -> float:
    """Tile density below which the blocked CPU kernel beats the masked-dense op, for ``tile``×``tile`` tiles."""
    return kernel_crossovers()["tile"]["density"][str(tile)]
