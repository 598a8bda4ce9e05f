"""The mask-carrying sparse linear op.

``mst::sparse_linear(x, weight, mask, bias, probe)`` computes ``x @ weightᵀ + bias`` where ``weight``
is already zero wherever ``mask`` is 0 (the runtime keeps that invariant after every optimizer step,
so the forward needs no extra masking pass). Its backward returns

- ``grad_x``      = grad_y @ weight
- ``grad_weight`` = (grad_yᵀ @ x) ⊙ mask     (masked: inactive weights get no gradient)
- ``grad_probe``  = grad_yᵀ @ x              (the dense weight gradient, only when asked for)

``probe`` is how the runtime asks for the dense gradient without any side channel: on the step
before a topology update it is a zero tensor of the weight's shape with ``requires_grad=True``, so
autograd delivers the dense gradient into ``probe.grad`` (gradient accumulation, DDP and
``torch.compile`` all see an ordinary input). On every other step it is an empty tensor and the
dense gradient is never formed beyond what the masked gradient needs.

Being a ``torch.library`` custom op, the node survives ``torch.fx``, ``torch.export`` and
``torch.compile`` unchanged. ``SparseWeight`` picks, per weight, the masked-dense op, the CSR kernels
(``csr.py``) or, for tile-structured masks, the tile op (``tile_linear.py``); all have these gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import TILE_KERNELS
from .csr import CsrStructure, choose_linear_kernel, csr_linear, csr_usable
from .tile_layout import TileLayout, is_tile_constant, n_tiles, not_tiled_message
from .tile_linear import backend_of, choose_tile_kernel, tile_linear, usable


@torch.library.custom_op("mst::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, probe: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


@sparse_linear.register_fake
def _(x, weight, mask, bias, probe):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias, probe = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, _, need_b, need_probe = ctx.needs_input_grad
    gy = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
    grad_x = grad_w = grad_b = grad_probe = None
    if need_x:
        grad_x = grad_y @ weight  # (..., in)
    if need_w or need_probe:
        dense = gy.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if need_probe:
            grad_probe = dense
        if need_w:
            grad_w = dense * mask if need_probe else dense.mul_(mask)
    if need_b and ctx.has_bias:
        grad_b = gy.sum(0)
    return grad_x, grad_w, None, grad_b, grad_probe


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


class SparseWeight(nn.Module):
    """The sparse state of ONE parameter tensor, called at every use site of that parameter.

    A tied weight (``lm_head`` sharing the token embedding) has one ``SparseWeight`` however many
    graph nodes use it, so all uses share one mask. The mask is a non-persistent buffer: it moves
    with ``.to()`` but ``sm.state_dict()`` keeps the model's own keys; masks are saved through
    ``sm.mst.state_dict()``.

    With ``use_tiles(b)`` the mask is constant on b×b tiles (docs/design.md §9): ``units`` and
    ``active_units()`` count tiles instead of weights, and ``layout`` lists the active tiles for the
    tile kernels (rebuilt whenever the mask changes).
    """

    def __init__(self, name: str, weight: nn.Parameter):
        super().__init__()
        self.name = name
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        self.probe = torch.empty(0, device=weight.device)  # no dense gradient asked for (on the weight's device)
        self._outside: Tensor | None = None  # on probe steps: the raw gradient of a weight with other uses
        self.kernel = "dense"  # "dense" (masked-dense op) | "csr" (CPU) | "tile" (blocked CPU) | "triton"
        self._csr: dict[bool, CsrStructure] = {}  # transposed -> structure of the current mask
        self.tile: int | None = None  # tile edge of a tile-structured mask (None: unstructured)
        self.layout: TileLayout | None = None  # the active tiles of the current mask (tile-structured only)

    @property
    def numel(self) -> int:
        return self.mask.numel()

    @property
    def units(self) -> int:
        """What densities are allocated in: tiles of a tile-structured weight, else weights."""
        return self.numel if self.tile is None else n_tiles(self.weight_shape, self.tile)

    def active(self) -> int:
        return int(self.mask.sum())

    def active_units(self) -> int:
        """Active tiles of a tile-structured weight, else active weights."""
        return self.active() if self.layout is None else self.layout.n

    def use_tiles(self, tile: int | None) -> None:
        """Structure the mask by ``tile`` x ``tile`` tiles (None: unstructured); the current mask must fit."""
        if tile is not None and not is_tile_constant(self.mask, tile):
            raise ValueError(not_tiled_message(self.name, self.mask, tile))
        self.tile = tile
        self.layout = None if tile is None else TileLayout(self.mask, tile)

    def set_mask(self, mask: Tensor) -> None:
        """Replace the mask (the only way masks change, so caches keyed on it stay valid)."""
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask for {self.name} has shape {tuple(mask.shape)}, expected {self.weight_shape}")
        if self.tile is not None and not is_tile_constant(mask, self.tile):
            raise ValueError(not_tiled_message(self.name, mask, self.tile))
        self.mask.copy_(mask)
        self._csr.clear()  # the compressed structure follows the mask; values are re-read every forward
        if self.tile is not None:
            self.layout = TileLayout(self.mask, self.tile)

    def _apply(self, fn, recurse=True):
        """``.to()``/``.cuda()``: the tile layout follows the mask to its device."""
        out = super()._apply(fn, recurse)
        if self.layout is not None and self.layout.device != self.mask.device:
            self.layout.to(self.mask.device)
        return out

    def select_kernel(self, setting: str = "auto") -> str:
        """Pick the linear kernel from the current mask density and device (call after masks change)."""
        density = self.active() / self.numel if self.numel else 1.0
        if self.tile is None:
            self.kernel = choose_linear_kernel(density, self.mask.device, self.weight_shape, setting)
        else:
            self.kernel = choose_tile_kernel(self.name, density, self.mask.device, self.weight_shape, self.tile, setting)
        return self.kernel

    def _structure(self, transposed: bool) -> CsrStructure:
        st = self._csr.get(transposed)
        if st is None or not st.valid_for(self.mask):  # also catches in-place edits and .to(device)
            st = self._csr[transposed] = CsrStructure(self.mask, transposed)
        return st

    def collect_dense_grad(self, on: bool) -> None:
        """Ask (or stop asking) the next backward passes for the dense weight gradient in ``probe.grad``."""
        if on:
            self.probe = torch.zeros(self.weight_shape, device=self.mask.device, requires_grad=True)
        else:
            self.probe = torch.empty(0, device=self.mask.device)
        self._outside = None

    def mask_gradient(self, grad: Tensor) -> Tensor:
        """Tensor hook of a weight that is also read outside the sparse op (a tied embedding).

        ``grad`` is the parameter's whole gradient, summed over all its uses: the sparse op's masked
        part plus the other uses' dense part. Masking it keeps inactive weights untrained; on probe
        steps the raw sum is kept so :meth:`dense_grad` can cover every use (docs/design.md §4)."""
        if self.probe.dim() == 2:
            g = grad.detach().float()
            self._outside = g if self._outside is None else self._outside + g  # sums micro-batches
        return grad * self.mask

    def dense_grad(self) -> Tensor | None:
        """The dense gradient w.r.t. the whole weight on a probe step (None when nothing was collected).

        The probe holds the sparse uses' dense gradient P; a weight with other uses also has the raw
        hook sum ``mask ⊙ P + E`` (E: the other uses), so the full gradient is that sum + ``P ⊙ ¬mask``."""
        probe = self.probe.grad
        if self._outside is None:
            return probe
        return self._outside if probe is None else self._outside + probe.float() * ~self.mask

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, transposed: bool = False) -> Tensor:
        mask, probe = self.mask, self.probe
        if torch.is_autocast_enabled(x.device.type):  # autocast skips custom ops: cast as it casts F.linear
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)  # the fp32 master weight gets its gradient through .to()
            bias = None if bias is None else bias.to(dtype)
        if self.kernel == "csr" and csr_usable(x, weight):
            return csr_linear(x, weight, bias, probe, self._structure(transposed))
        if self.kernel in TILE_KERNELS and usable(x, weight, backend_of(self.kernel)):
            return self._tile_forward(x, weight, bias, probe, transposed)
        if transposed:  # weight stored (in, out), as in HF Conv1D / x @ W
            weight, mask = weight.t(), mask.t()
            if probe.dim() == 2:
                probe = probe.t()
        if probe.dim() == 2 and probe.dtype != weight.dtype:
            probe = probe.to(weight.dtype)
        return sparse_linear(x, weight, mask, bias, probe)

    def _tile_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None, probe: Tensor, transposed: bool) -> Tensor:
        """The tile op on W (as used: Wᵀ of a weight stored (in, out)); the layout's orders follow the use."""
        mask = self.mask
        if transposed:
            weight, mask = weight.t(), mask.t()
            if probe.dim() == 2:
                probe = probe.t()
        if probe.dim() == 2 and probe.dtype != weight.dtype:
            probe = probe.to(weight.dtype)
        return tile_linear(x, weight, mask, bias, probe, *self.layout.for_use(transposed), self.tile, backend_of(self.kernel))


def swap_last(t: Tensor) -> Tensor:
    """Swap the last two dims (a no-op on a vector): ``W @ x`` is computed as ``swap(swap(x) @ Wᵀ)``."""
    return t.transpose(-2, -1) if t.dim() >= 2 else t
