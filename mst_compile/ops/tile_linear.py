"""The tile-sparse linear op: ``mst::tile_linear``, MST's FLOP savings as wall-clock time for
tile-structured masks (``MSTConfig.tile``), on CPU (blocked kernel) and CUDA (Triton).

``mst::tile_linear(x, weight, mask, bias, probe, row_ptr, cols, rows, col_ptr, rows_t, tile, backend)``
computes ``x @ weightᵀ + bias`` over the active tiles of ``weight`` (which is zero off the mask, as
on the masked-dense path) and has the masked-dense op's gradients:

- forward   y  = x Wᵀ                 ``mst::tile_mm`` over the rows of the tile grid
- backward  dx = dy W                 ``mst::tile_mm`` on Wᵀ, over the columns of the grid
- backward  dW = (dyᵀ x) on the active tiles only, zero elsewhere (``mst::tile_sddmm``); on a probe
  step (the step before a topology update, ``probe`` a 2-D tensor requiring grad) the dense
  gradient dyᵀ x is formed once by a dense GEMM: it is ``probe``'s gradient, and masked it is W's.

``backend`` is ``"cpu"`` (``tile_cpu``, fp32) or ``"triton"`` (``tile_triton``: fp16/bf16/fp32 on
CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``). All three are ``torch.library`` custom ops,
so the node and its backward survive ``torch.compile``. The layout tensors (``TileLayout``) are
ordinary inputs: the op reads which tiles are active from them, never from the mask.

``choose_tile_kernel`` is the policy: which kernel a tile-structured weight runs on which device. On CPU
"auto" takes the blocked kernel below the lowest break-even tile density measured for the tile edge
(``crossovers.tile_crossover``, written by ``benchmarks/tiles.py --package``; never for 8×8 tiles,
where one BLAS call per tile costs more than it saves).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import MstCompileError
from . import tile_cpu, tile_triton
from .crossovers import tile_crossover

_MIN_EDGE = 64  # weights with a side below this stay masked dense under "auto": the call overhead outweighs any saving


@torch.library.custom_op("mst::tile_mm", mutates_args=())
def tile_mm(x: Tensor, weight: Tensor, ptr: Tensor, idx: Tensor, tile: int, backend: str) -> Tensor:
    """(N, out) = x (N, in) @ weightᵀ over the active tiles: row r of the grid holds tiles idx[ptr[r]:ptr[r+1]]."""
    return _mm(x, weight, ptr, idx, tile, backend)


def _mm(x: Tensor, weight: Tensor, ptr: Tensor, idx: Tensor, tile: int, backend: str) -> Tensor:
    return (tile_cpu.mm if backend == "cpu" else tile_triton.mm)(x, weight, ptr, idx, tile)


@tile_mm.register_fake
def _(x, weight, ptr, idx, tile, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("mst::tile_sddmm", mutates_args=())
def tile_sddmm(gy: Tensor, x: Tensor, rows: Tensor, cols: Tensor, tile: int, backend: str) -> Tensor:
    """(out, in) = gyᵀ @ x on the tiles (rows[i], cols[i]), zero elsewhere."""
    if backend == "cpu":
        return tile_cpu.sddmm(gy, x, rows, cols, tile)
    return tile_triton.sddmm(gy, x, rows, cols, tile)


@tile_sddmm.register_fake
def _(gy, x, rows, cols, tile, backend):
    return gy.new_empty((gy.shape[1], x.shape[1]))


@torch.library.custom_op("mst::tile_linear", mutates_args=())
def tile_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, probe: Tensor, row_ptr: Tensor, cols: Tensor,
                rows: Tensor, col_ptr: Tensor, rows_t: Tensor, tile: int, backend: str) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = _mm(x2, weight, row_ptr, cols, tile, backend)  # (N, out); the kernel itself: this body is already inside an op
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], weight.shape[0])


@tile_linear.register_fake
def _(x, weight, mask, bias, probe, row_ptr, cols, rows, col_ptr, rows_t, tile, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, probe, row_ptr, cols, rows, col_ptr, rows_t, tile, backend = inputs
    ctx.save_for_backward(x, weight, mask, rows, cols, col_ptr, rows_t)
    ctx.has_bias, ctx.tile, ctx.backend = bias is not None, tile, backend


def _backward(ctx, grad_y):
    x, weight, mask, rows, cols, col_ptr, rows_t = ctx.saved_tensors
    need_x, need_w, _, need_b, need_probe = ctx.needs_input_grad[:5]
    gy = grad_y.reshape(-1, grad_y.shape[-1]).contiguous()  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    grad_x = grad_w = grad_b = grad_probe = None
    if need_x:
        grad_x = tile_mm(gy, weight.t(), col_ptr, rows_t, ctx.tile, ctx.backend).view(x.shape)  # dy W, by columns
    if need_probe:  # the dense gradient, asked for before a topology update
        grad_probe = gy.t() @ x2  # (out, in)
        if need_w:
            grad_w = grad_probe * mask
    elif need_w:
        grad_w = tile_sddmm(gy, x2, rows, cols, ctx.tile, ctx.backend)
    if need_b and ctx.has_bias:
        grad_b = gy.sum(0)
    return grad_x, grad_w, None, grad_b, grad_probe, None, None, None, None, None, None, None


tile_linear.register_autograd(_backward, setup_context=_setup_context)


def usable(x: Tensor, weight: Tensor, backend: str) -> bool:
    """Whether the tile op can run these inputs (else the caller takes the masked-dense op, which
    computes the same): matching dtypes the backend supports, on its device, with rows to compute."""
    if x.dtype != weight.dtype or x.device != weight.device or x.dim() < 2 or weight.dim() != 2:
        return False
    if backend == "cpu":
        return x.device.type == "cpu" and x.dtype == torch.float32
    return x.dtype in tile_triton.TRITON_DTYPES and (x.device.type == "cuda" or tile_triton.interpreting())


def backend_of(kernel: str) -> str:
    """The op's backend for a site's kernel name ("tile": the blocked CPU kernel, "triton")."""
    return "cpu" if kernel == "tile" else "triton"


def choose_tile_kernel(name: str, density: float, device: torch.device | str, shape: tuple[int, ...], tile: int,
                       setting: str = "auto") -> str:
    """Pick the kernel of one tile-structured weight: "dense" (masked dense), "tile" or "triton".

    ``setting`` is ``MSTConfig.sparse_kernel``: "dense" forces the masked-dense op; "tile" the tile
    kernel of the weight's device (the blocked kernel on CPU, Triton on CUDA); "triton" the Triton
    kernels (on CPU only under Triton's interpreter, ``TRITON_INTERPRET=1``). "auto" takes the
    blocked kernel on CPU below the crossover measured for this tile edge, and the masked-dense op
    on GPUs, where the op was measured slower than cuBLAS end to end (benchmarks/results/gpu/). A kernel that cannot run is one error line.
    """
    device = torch.device(device)
    if setting == "dense":
        return "dense"
    if setting == "triton" or (setting == "tile" and device.type == "cuda"):
        if not tile_triton.available():
            raise MstCompileError(f"weight '{name}': sparse_kernel={setting!r} runs Triton kernels, but Triton is not installed; "
                               "pip install triton (or use sparse_kernel='auto')")
        if device.type != "cuda" and not tile_triton.interpreting():
            raise MstCompileError(f"weight '{name}' is on {device}: sparse_kernel='triton' runs Triton kernels, which need a CUDA "
                               "device; use sparse_kernel='tile' (the blocked CPU kernel), or set TRITON_INTERPRET=1 to run "
                               "them in Triton's interpreter (slow: tests only)")
        return "triton"
    if setting == "tile":
        if device.type != "cpu":
            raise MstCompileError(f"weight '{name}' is on {device}: the tile kernels run on CPU and CUDA; use sparse_kernel='dense'")
        if not tile_cpu.available():
            raise MstCompileError(f"weight '{name}': sparse_kernel='tile' needs the blocked CPU tile kernel, which could not be "
                               f"built ({tile_cpu.why_unavailable()}); use sparse_kernel='auto' or 'dense'")
        return "tile"
    if setting != "auto":
        raise ValueError(f"sparse_kernel={setting!r} is invalid for tile-structured weights: expected auto, dense, tile or triton")
    if device.type != "cpu" or min(shape) < _MIN_EDGE or density >= tile_crossover(tile):
        return "dense"
    return "tile" if tile_cpu.available() else "dense"
