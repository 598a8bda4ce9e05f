"""Hybrid sparse attention as three mask-free causal attention calls (docs/design.md §5), any device.

With T padded to n·l (n = ⌈T/l⌉), position a·l + r is row a, column r of an (n, l) grid. For a query
i = a·l + r and a key j <= i:

- strided, (i − j) mod l == 0: the key is in the same column r. The l columns are l independent
  causal sequences of length n (the grid transposed), so the strided part is ONE batched causal
  attention call over (B·H, l, n). In ``sparse`` the key j = i is also in the band; the strided part
  then leaves it out by attending rows 1..n−1 to rows 0..n−2: still square and causal ("res").
- local, i − j < l: the keys lie in the query's own row (block) at columns <= r, which is causal
  attention within each block ("diag", (B·H, n, l)), and in the previous row at columns > r.
  Reversing the order of both the queries and the keys turns "column > r" into a strictly causal
  square: query columns l−2..0 of row a against key columns l−1..1 of row a−1 ("prev").

The parts' key sets are disjoint, so they merge exactly by log-sum-exp: lse = log Σ_p e^(lse_p),
out = Σ_p e^(lse_p − lse)·out_p. A row a part does not reach (the last column in "prev", row 0 in
"res") carries lse = −inf there. No T×T matrix is formed: the largest score block is l×l or n×n.

Backward: attention's gradient needs the probabilities P = e^(S − lse) and the row sums
Σ dO·O. Given the MERGED out and lse, each part's own backward kernel therefore returns exactly its
share of dQ and the dK/dV of its keys, so no gradient has to flow through an lse and none is formed.

Padding: all three parts attend keys at or before the query, so the keys past T are never reached
by a real query, and padded query rows get a zero output gradient.

Each part runs on one of three backends: aten's CPU flash kernels (any CPU float dtype); aten's
CUDA flash kernels (fp16/bf16, head dim a multiple of 8 up to 256, sequences of 32 rows or more);
plain matmuls (everything else, e.g. fp32 on a GPU or the short residue sequences at l = T/8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG = float("-inf")
BACKENDS = ("auto", "cpu_flash", "cuda_flash", "math")
CUDA_FLASH_MIN_LEN = 32  # shorter causal sequences fill little of a flash tile: matmuls do them


@dataclass(frozen=True)
class _Part:
    """One causal sub-problem: where its queries and keys sit in the (BH, n, l, ...) grid."""

    kind: str  # "diag" | "prev" | "res"
    n: int
    l: int
    shift: int = 0  # "res": 1 leaves out j == i (it is in the band)

    def region_q(self, x: Tensor) -> Tensor:
        """View of a (BH, n, l, ...) grid at this part's query rows, in grid order."""
        if self.kind == "diag":
            return x
        if self.kind == "prev":
            return x[:, 1:, :self.l - 1]  # (BH, n-1, l-1, ...): rows 1.., columns 0..l-2
        return x.transpose(1, 2)[:, :, self.shift:]  # (BH, l, n-shift, ...)

    def region_k(self, x: Tensor) -> Tensor:
        """View of a (BH, n, l, ...) grid at this part's key rows, in grid order."""
        if self.kind == "diag":
            return x
        if self.kind == "prev":
            return x[:, :-1, 1:]  # (BH, n-1, l-1, ...): rows ..n-2, columns 1..l-1
        return x.transpose(1, 2)[:, :, :self.n - self.shift]

    def orient(self, x: Tensor) -> Tensor:
        """Grid order <-> the part's causal order (an involution: "prev" reverses the columns)."""
        return x.flip(2) if self.kind == "prev" else x

    def q(self, x: Tensor) -> Tensor:
        return self.orient(self.region_q(x))

    def k(self, x: Tensor) -> Tensor:
        return self.orient(self.region_k(x))


def _parts(n: int, l: int, local: bool, strided: bool) -> list[_Part]:
    parts = []
    if local:
        parts.append(_Part("diag", n, l))
        if n > 1 and l > 1:
            parts.append(_Part("prev", n, l))
    if strided and n - local > 0:
        parts.append(_Part("res", n, l, shift=int(local)))
    return parts


# -- backends: causal attention over (N, G, L, D) returning (out, lse), and its backward -----------
def backend_for(q: Tensor, L: int, backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    if q.device.type == "cpu":
        return "cpu_flash" if q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else "math"
    D = q.shape[-1]
    flash = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256
    return "cuda_flash" if flash and L >= CUDA_FLASH_MIN_LEN else "math"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types, the input's own for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Causal scores of one part (N, G, L, L), −inf above the diagonal, in the accumulation dtype."""
    a = _acc(q.dtype)
    s = torch.matmul(q.to(a), k.to(a).transpose(-1, -2)) * scale  # (N, G, L, L)
    L = s.shape[-1]
    return s.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=s.device).triu_(1), _NEG)


def _forward(name: str, q: Tensor, k: Tensor, v: Tensor, scale: float):
    """(out (N, G, L, D) in q's dtype, lse (N, G, L) fp32, kernel state for the backward)."""
    if name == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse, ()
    if name == "cuda_flash":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (seed, offset)
    s = _scores(q, k, scale)
    lse = torch.logsumexp(s, -1)  # (N, G, L)
    return torch.matmul(torch.exp(s - lse[..., None]), v.to(s.dtype)).to(q.dtype), lse, ()


def _backward(name: str, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, state, scale: float):
    """(dq, dk, dv) of one part given the MERGED out and lse of its query rows."""
    if name == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, True, scale=scale)
    if name == "cuda_flash":
        L = q.shape[2]
        seed, offset = state
        c = lambda x: x.contiguous()
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            c(do), c(q), c(k), c(v), c(out), c(lse), None, None, L, L, 0.0, True, seed, offset, scale=scale)
    p = torch.exp(_scores(q, k, scale) - lse[..., None])  # (N, G, L, L)
    a = p.dtype
    do = do.to(a)
    dv = torch.matmul(p.transpose(-1, -2), do)  # (N, G, L, D)
    dp = torch.matmul(do, v.to(a).transpose(-1, -2))  # (N, G, L, L)
    ds = p * (dp - (do * out.to(a)).sum(-1, keepdim=True)) * scale
    return torch.matmul(ds, k.to(a)), torch.matmul(ds.transpose(-1, -2), q.to(a)), dv


# -- the op --------------------------------------------------------------------------------------
def _grid(x: Tensor, n: int, l: int, groups: int = 1) -> Tensor:
    """(B, Hx, T, D) -> (B·Hx·groups, n, l, D), zero-padded to n·l positions, each head repeated ``groups`` times."""
    B, H, T, D = x.shape
    if groups > 1:
        x = x.repeat_interleave(groups, 1)
    if n * l > T:
        x = F.pad(x, (0, 0, 0, n * l - T))
    return x.reshape(B * H * groups, n, l, D)


class _HSAResidue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, l: int, local: bool, strided: bool, scale: float, backend: str):
        B, H, T, D = q.shape
        Hkv, n = k.shape[1], -(-T // l)
        qg, kg, vg = _grid(q, n, l), _grid(k, n, l, H // Hkv), _grid(v, n, l, H // Hkv)  # (BH, n, l, D)
        parts = _parts(n, l, local, strided)
        names, results = [], []
        for p in parts:
            pq = p.q(qg)
            name = backend_for(pq, pq.shape[2], backend)
            names.append(name)
            results.append(_forward(name, pq, p.k(kg), p.k(vg), scale))
        lses = []
        for p, (_, lse, _) in zip(parts, results):
            full = lse.new_full(qg.shape[:3], _NEG)  # (BH, n, l): −inf where the part has no keys
            p.region_q(full).copy_(p.orient(lse))
            lses.append(full)
        lse = torch.logsumexp(torch.stack(lses), 0)  # (BH, n, l): every row has its own key, so finite
        out = torch.zeros(qg.shape, dtype=_acc(q.dtype), device=q.device)  # (BH, n, l, D)
        for p, (o, lp, _) in zip(parts, results):
            w = torch.exp(lp - p.q(lse))[..., None].to(out.dtype)  # the part's share of each row's softmax mass
            p.region_q(out).add_(p.orient(o.to(out.dtype) * w))
        out = out.to(q.dtype)
        states = [t for _, _, st in results for t in st]
        ctx.save_for_backward(qg, kg, vg, out, lse, *states)
        ctx.meta = (parts, names, scale, (B, H, Hkv, T, D))
        return out.view(B, H, n * l, D)[:, :, :T]

    @staticmethod
    def backward(ctx, grad):
        qg, kg, vg, out, lse, *states = ctx.saved_tensors
        parts, names, scale, (B, H, Hkv, T, D) = ctx.meta
        n, l = qg.shape[1:3]
        dog = _grid(grad.to(qg.dtype), n, l)  # (BH, n, l, D), zero on padded rows
        dq = torch.zeros(qg.shape, dtype=_acc(qg.dtype), device=qg.device)
        dk, dv = torch.zeros_like(dq), torch.zeros_like(dq)
        for p, name in zip(parts, names):
            state = (states.pop(0), states.pop(0)) if name == "cuda_flash" else ()
            gq, gk, gv = _backward(name, p.q(dog), p.q(qg), p.k(kg), p.k(vg), p.q(out), p.q(lse).contiguous(), state, scale)
            p.region_q(dq).add_(p.orient(gq.to(dq.dtype)))
            p.region_k(dk).add_(p.orient(gk.to(dq.dtype)))
            p.region_k(dv).add_(p.orient(gv.to(dq.dtype)))
        g = H // Hkv
        unpad = lambda x, heads: x.view(B, heads, n * l, D)[:, :, :T]
        dq = unpad(dq, H).to(qg.dtype)
        dk = unpad(dk, H).view(B, Hkv, g, T, D).sum(2).to(kg.dtype)
        dv = unpad(dv, H).view(B, Hkv, g, T, D).sum(2).to(vg.dtype)
        return dq, dk, dv, None, None, None, None, None


def hsa_residue(q: Tensor, k: Tensor, v: Tensor, *, local: bool, strided: bool, stride: int,
                scale: float | None = None, backend: str = "auto") -> Tensor:
    """Causal attention over the band (``local``) and/or residues (``strided``) of stride ``stride``.

    q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 (arguments validated by ``hsa_attention``).
    ``backend`` forces one kernel for every part ("math" runs anywhere; tests use it on CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"hsa_residue: backend={backend!r} is invalid; expected one of {', '.join(BACKENDS)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _HSAResidue.apply(q, k, v, stride, local, strided, scale, backend)
