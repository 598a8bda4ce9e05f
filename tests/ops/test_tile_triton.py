"""The Triton tile kernels in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, fp32 and fp16)
against a masked-dense oracle: forward, both gradients, probe steps, edge tiles, empty rows of tiles,
tiles below tl.dot's 16 and weights stored (in, out). Shapes are tiny: the interpreter is slow."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from _models import tiny_gpt

import mst_compile
from mst_compile.ops import tile_triton
from mst_compile.ops.sparse_linear import SparseWeight
from mst_compile.ops.tile_layout import TileLayout, expand, grid


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are first jitted (per setting)


def tile_mask(shape, tile, seed=0):
    g = torch.Generator().manual_seed(seed)
    tm = torch.rand(grid(shape, tile), generator=g) < 0.5
    tm[0] = False  # an empty row of tiles
    tm[-1, -1] = True  # an active edge tile
    return expand(tm, shape, tile)


CASES = [((40, 24), 8, 5), ((70, 45), 16, 9), ((64, 96), 32, 20)]  # tile 8 < 16, edge tiles, divisible


@pytest.mark.parametrize("shape,tile,tokens", CASES, ids=["tile8", "edge-tiles", "divisible"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("split", [None, 3], ids=["one-chunk", "three-chunks"])
def test_triton_kernels_match_masked_dense(shape, tile, tokens, dtype, split):
    if split:
        tokens = 150  # three chunks of 64 tokens, the last one partial
    mask = tile_mask(shape, tile)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * mask).to(dtype)
    x = torch.randn(tokens, shape[1], generator=g).to(dtype)
    gy = torch.randn(tokens, shape[0], generator=g).to(dtype)
    lay = TileLayout(mask, tile)
    y = tile_triton.mm(x, w, lay.row_ptr, lay.cols, tile)
    dx = tile_triton.mm(gy, w.t(), lay.col_ptr, lay.rows_t, tile)
    dw = tile_triton.sddmm(gy, x, lay.rows, lay.cols, tile, split=split)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    f = lambda t: t.float()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(f(y), f(x) @ f(w).t(), **tol)
    torch.testing.assert_close(f(dx), f(gy) @ f(w), **tol)
    torch.testing.assert_close(f(dw), (f(gy).t() @ f(x)) * mask, **tol)
    assert torch.all(dw[~mask] == 0)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
@pytest.mark.parametrize("probe_step", [False, True], ids=["sampled-dW", "probe"])
def test_sparse_weight_on_triton_gives_the_masked_dense_gradients(transposed, probe_step):
    shape, tile = (70, 45), 16
    mask = tile_mask(shape, tile, seed=3)
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=g) * mask
    x0 = torch.randn(2, 6, shape[1], generator=g)
    b0 = torch.randn(shape[0], generator=g)
    gy = torch.randn(2, 6, shape[0], generator=g)
    xr, wr, br = (t.clone().requires_grad_() for t in (x0, w0, b0))
    F.linear(xr, wr * mask, br).backward(gy)

    weight = torch.nn.Parameter(w0.t().contiguous() if transposed else w0.clone())
    sw = SparseWeight("w", weight)
    sw.use_tiles(tile)
    sw.set_mask(mask.t().contiguous() if transposed else mask)
    assert sw.select_kernel("triton") == "triton"
    if probe_step:
        sw.collect_dense_grad(True)
    x, b = x0.clone().requires_grad_(), torch.nn.Parameter(b0.clone())
    y = sw(x, weight, b, transposed=transposed)
    y.backward(gy)
    torch.testing.assert_close(y, F.linear(x0, w0, b0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, br.grad, rtol=1e-5, atol=1e-5)
    dw = weight.grad.t() if transposed else weight.grad
    torch.testing.assert_close(dw, wr.grad * mask, rtol=1e-4, atol=1e-4)
    if probe_step:
        dense = sw.dense_grad().t() if transposed else sw.dense_grad()
        torch.testing.assert_close(dense, gy.reshape(-1, shape[0]).t() @ x0.reshape(-1, shape[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tile", [16, 64, 128])
def test_triton_on_cuda_matches_masked_dense(monkeypatch, tile, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels on the GPU
    shape = (3 * 256 + 40, 512 + 24)  # edge tiles
    mask = tile_mask(shape, tile).cuda()
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=g).cuda() * mask
    x0 = torch.randn(300, shape[1], generator=g).cuda()
    gy = torch.randn(300, shape[0], generator=g).cuda()
    xr, wr = x0.to(dtype).float().requires_grad_(), w0.to(dtype).float().requires_grad_()
    F.linear(xr, wr * mask).backward(gy.to(dtype).float())
    weight = torch.nn.Parameter(w0.to(dtype))
    sw = SparseWeight("w", weight)
    sw.use_tiles(tile)
    sw.set_mask(mask)
    assert sw.select_kernel("tile") == "triton"
    x = x0.to(dtype).requires_grad_()
    y = sw(x, weight)
    y.backward(gy.to(dtype))
    tol = dict(rtol=2e-2, atol=2e-1)  # fp32 accumulation of 16-bit inputs, against fp32 of the same inputs
    torch.testing.assert_close(y.float(), F.linear(xr, wr).detach(), **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(weight.grad.float(), wr.grad * mask, **tol)
    assert torch.all(weight.grad[~mask] == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_mst_step_on_cuda_with_tiles(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.7, tile=16,
                                sparse_kernel="tile")
    sm = mst_compile.sparsify(tiny_gpt().cuda(), cfg, total_steps=8)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    assert {s.sparse.kernel for s in sm.mst.weight_sites.values()} == {"triton"}
    compiled = torch.compile(sm)
    x = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        for s in sm.mst.weight_sites.values():
            assert torch.all(s.param[~s.mask] == 0)
    assert sm.mst.last_update["step"] == 6 and not sm.mst.last_update["gradient_fallback"]


def test_kernels_compile_for_a_hopper_gpu(monkeypatch, tmp_path):
    """Lowered to PTX for sm_90 (H100/H200) without a GPU: what the interpreter cannot check (tl.dot
    shapes and dtypes, shared memory) fails here rather than on the GPU machine."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mm, sddmm, sddmm_sum = tile_triton._kernels(False)
    for tile in (16, 128):
        b = tile_triton._block(tile, 64)
        n = -(-tile // b)
        for fn, tensors, consts in [  # every other argument is an index or stride: i32
            (mm, ("x", "w", "y"), {"TILE": tile, "BM": 64, "BN": b, "BK": b, "NSUB": n}),
            (sddmm, ("gy", "x", "part"), {"TILE": tile, "BR": b, "BC": b, "BM": 64, "NC": n}),
            (sddmm_sum, ("part", "g"), {"TILE": tile, "BR": b, "BC": b, "NC": n}),
        ]:
            index = ("ptr", "idx") if fn is mm else ("rows", "cols")
            params = fn.arg_names
            sig = {a: ("*fp32" if a == "part" else "*bf16") if a in tensors else "*i32" if a in index else
                   "constexpr" if a in consts else "i32" for a in params}
            compiled = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
            assert ".entry" in compiled.asm["ptx"] and compiled.metadata.shared <= 228 * 1024
