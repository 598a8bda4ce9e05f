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

An empty ``mask`` means "no mask here": ``grad_weight`` is then the dense gradient. Under FSDP2
(docs/design.md §4, "Sharded") a ``SparseWeight`` holds only its rank's slice of the mask, the weight
the forward sees is the all-gathered one, exactly zero at masked entries, and the gradient is masked
on the local shard after FSDP's reduce-scatter (``SparseWeight.grad_ready``).

Being a ``torch.library`` custom op, the node survives ``torch.fx``, ``torch.export`` and
``torch.compile`` unchanged. ``SparseWeight`` picks, per weight, the masked-dense op, the CSR kernels
(``csr.py``) or, for tile-structured masks, the tile op (``tile_linear.py``); all have these gradients.
"""
from __future__ import annotations

import math

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
            if mask.numel() == 0:  # sharded: masked on the local shard after the reduce-scatter
                grad_w = dense.clone() if need_probe else dense
            else:
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

    Sharded (``shard_like(param)`` with FSDP2's DTensor parameter, docs/design.md §4): the mask buffer
    becomes this rank's slice of the mask, laid out as the parameter's local shard (the same mesh and
    placements); ``set_mask`` still takes the whole mask and keeps the slice and the whole count, the
    forward passes no mask (the masked-dense kernel on the all-gathered weight), and a probe step
    collects this rank's slice of the dense gradient in ``grad_ready`` instead of through ``probe``.
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
        self.shard: tuple | None = None  # sharded: (mesh, placements) of the DTensor parameter
        self._active = 0  # sharded: the whole weight's active count (the buffer holds one slice)
        self._collect = False  # sharded: this step forms the dense gradient
        self._dense: Tensor | None = None  # sharded: this rank's slice of the dense gradient, summed over micro-batches

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def units(self) -> int:
        """What densities are allocated in: tiles of a tile-structured weight, else weights."""
        return self.numel if self.tile is None else n_tiles(self.weight_shape, self.tile)

    def active(self) -> int:
        return self._active if self.shard is not None else int(self.mask.sum())

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
        """Replace the mask (the only way masks change, so caches keyed on it stay valid). Sharded: the
        whole mask, of which this rank keeps its slice."""
        if self.shard is not None:
            if tuple(mask.shape) != self.weight_shape:
                raise ValueError(f"mask for {self.name} has shape {tuple(mask.shape)}, expected {self.weight_shape}")
            self.set_local_mask(self.slice_of(mask.to(self.mask.device, torch.bool)), int(mask.sum()))
            return
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask for {self.name} has shape {tuple(mask.shape)}, expected {self.weight_shape}")
        if self.tile is not None and not is_tile_constant(mask, self.tile):
            raise ValueError(not_tiled_message(self.name, mask, self.tile))
        self.mask.copy_(mask)
        self._csr.clear()  # the compressed structure follows the mask; values are re-read every forward
        if self.tile is not None:
            self.layout = TileLayout(self.mask, self.tile)

    # -- sharded (FSDP2) ---------------------------------------------------------------------------
    def shard_like(self, param: Tensor) -> None:
        """Follow FSDP2's DTensor ``param``: keep this rank's slice of the current (whole) mask."""
        if self.shard is None:
            full = self.mask
            self.shard = (param.device_mesh, tuple(param.placements))
            self._active = int(full.sum())
            self.register_buffer("mask", self.slice_of(full.to(param.device)), persistent=False)
        self.collect_dense_grad(False)
        self.kernel = "dense"

    def slice_of(self, full: Tensor) -> Tensor:
        """This rank's slice of a whole tensor of the weight's shape, as the parameter is sliced (no communication)."""
        from torch.distributed.tensor import distribute_tensor

        mesh, placements = self.shard
        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local().contiguous()

    def set_local_mask(self, mask: Tensor, active: int) -> None:
        """Sharded: this rank's slice of a new mask, and the whole mask's active count."""
        self.mask.copy_(mask)
        self._active = active

    def as_dtensor(self, local: Tensor):
        """``local`` (a slice shaped like this rank's shard) as the DTensor of the whole weight."""
        from torch.distributed.tensor import DTensor

        mesh, placements = self.shard
        shape = torch.Size(self.weight_shape)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)

    def full_mask(self) -> Tensor:
        """The whole mask (sharded: all-gathered, a collective every rank must call; else the buffer)."""
        if self.shard is None:
            return self.mask
        return self.as_dtensor(self.mask.to(torch.uint8)).full_tensor().bool()

    def grad_ready(self, param: Tensor) -> None:
        """FSDP2 calls this once the local shard of ``param``'s gradient is reduce-scattered (and
        accumulated): keep the dense part on a probe step, then mask the shard.

        With gradient accumulation the shard holds ``mask ⊙ D + r`` (D: the dense sum so far, r: the
        new micro-batch), so the dense sum becomes that plus ``D ⊙ ¬mask``."""
        with torch.no_grad():
            grad = param.grad.to_local()
            if self._collect:
                g = grad.detach().float()
                self._dense = g.clone() if self._dense is None else g + self._dense * ~self.mask
            grad.mul_(self.mask)

    @property
    def probing(self) -> bool:
        """True while the backward forms the dense gradient (the ledger charges it)."""
        return self.probe.dim() == 2 or self._collect

    def holds_dense_grad(self) -> bool:
        return self.probe.grad is not None or self._dense is not None

    def _apply(self, fn, recurse=True):
        """``.to()``/``.cuda()``: the tile layout follows the mask to its device."""
        out = super()._apply(fn, recurse)
        if self.layout is not None and self.layout.device != self.mask.device:
            self.layout.to(self.mask.device)
        return out

    def select_kernel(self, setting: str = "auto") -> str:
        """Pick the linear kernel from the current mask density and device (call after masks change)."""
        density = self.active() / self.numel if self.numel else 1.0
        if self.shard is not None:  # the sparse kernels need the whole mask's structure
            self.kernel = "dense"
        elif self.tile is None:  # under MSTConfig.tile only a tied embedding (§9): a forced tile kernel means auto
            self.kernel = choose_linear_kernel(density, self.mask.device, self.weight_shape,
                                               "auto" if setting in TILE_KERNELS else setting)
        else:
            self.kernel = choose_tile_kernel(self.name, density, self.mask.device, self.weight_shape, self.tile, setting)
        return self.kernel

    def _structure(self, transposed: bool) -> CsrStructure:
        st = self._csr.get(transposed)
        if st is None or not st.valid_for(self.mask):  # also catches in-place edits and .to(device)
            st = self._csr[transposed] = CsrStructure(self.mask, transposed)
        return st

    def collect_dense_grad(self, on: bool) -> None:
        """Ask (or stop asking) the next backward passes for the dense weight gradient in ``probe.grad``
        (sharded: this rank's slice of it, in ``grad_ready``)."""
        if self.shard is not None:
            self._collect, self._dense = on, None
            return
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
        if self.shard is not None:
            return self._dense
        probe = self.probe.grad
        if self._outside is None:
            return probe
        return self._outside if probe is None else self._outside + probe.float() * ~self.mask

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, transposed: bool = False) -> Tensor:
        mask, probe = self.mask, self.probe
        if self.shard is not None:  # the gathered weight is zero where masked; the gradient is masked per shard
            mask = mask.new_empty(0)
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
