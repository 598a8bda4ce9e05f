"""The tile-sparse linear op on the blocked CPU kernel against a masked-dense oracle (autograd of
F.linear on the masked weight): forward, both gradients, probe steps, edge tiles, empty rows of tiles,
weights stored (in, out), torch.compile, and the kernel choice."""
import pytest
import torch
import torch.nn.functional as F

from mst_compile.errors import MstCompileError
from mst_compile.ops import tile_cpu
from mst_compile.ops.crossovers import tile_crossover
from mst_compile.ops.sparse_linear import SparseWeight
from mst_compile.ops.tile_layout import TileLayout, expand, grid, is_tile_constant, tile_norms, to_tiles
from mst_compile.ops.tile_linear import choose_tile_kernel, tile_linear

pytestmark = pytest.mark.skipif(not tile_cpu.available(), reason="the blocked CPU tile kernel could not be built here")


def tile_mask(shape, tile, density, seed=0, empty_row=True):
    """A random tile-structured mask (R, C); with ``empty_row`` the first row of tiles is all off."""
    g = torch.Generator().manual_seed(seed)
    tm = torch.rand(grid(shape, tile), generator=g) < density
    if empty_row:
        tm[0] = False
    tm[-1, -1] = True  # an active edge tile
    return expand(tm, shape, tile)


def oracle(x, w, mask, b, gy):
    """y, dx, dW (masked), db and the dense dW of the masked-dense op, by autograd of plain F.linear."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = F.linear(x, w * mask, b)
    y.backward(gy)
    dense = gy.reshape(-1, gy.shape[-1]).t() @ x.detach().reshape(-1, x.shape[-1])
    return y.detach(), x.grad, w.grad * mask, b.grad, dense


@pytest.mark.parametrize("shape,tile,tokens", [((96, 64), 32, 20), ((70, 45), 16, 33), ((40, 24), 8, 5), ((130, 200), 64, 3)],
                         ids=["divisible", "edge-tiles", "tile8", "edge-tiles-64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
@pytest.mark.parametrize("probe_step", [False, True], ids=["sampled-dW", "probe"])
def test_tile_linear_matches_masked_dense(shape, tile, tokens, transposed, probe_step):
    out_f, in_f = shape
    mask = tile_mask(shape, tile, 0.5)
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(shape, generator=g) * mask
    x0 = torch.randn(2, tokens, in_f, generator=g)
    b0 = torch.randn(out_f, generator=g)
    gy = torch.randn(2, tokens, out_f, generator=g)
    want_y, want_dx, want_dw, want_db, want_dense = oracle(x0, w0, mask, b0, gy)

    stored = w0.t().contiguous() if transposed else w0.clone()  # HF Conv1D keeps (in, out)
    weight = torch.nn.Parameter(stored)
    sw = SparseWeight("w", weight)
    sw.use_tiles(tile)
    sw.set_mask(mask.t().contiguous() if transposed else mask)
    assert sw.select_kernel("tile") == "tile"
    if probe_step:
        sw.collect_dense_grad(True)
    x, b = x0.clone().requires_grad_(), torch.nn.Parameter(b0.clone())
    y = sw(x, weight, b, transposed=transposed)
    y.backward(gy)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, want_db, rtol=1e-5, atol=1e-5)
    dw = weight.grad.t() if transposed else weight.grad
    torch.testing.assert_close(dw, want_dw, rtol=1e-4, atol=1e-4)
    assert torch.all(dw[~mask] == 0)  # inactive tiles get no gradient
    if probe_step:
        dense = sw.dense_grad().t() if transposed else sw.dense_grad()
        torch.testing.assert_close(dense, want_dense, rtol=1e-4, atol=1e-4)


def test_all_tiles_off_and_no_tokens():
    weight = torch.nn.Parameter(torch.zeros(64, 32))
    sw = SparseWeight("w", weight)
    sw.use_tiles(16)
    sw.set_mask(torch.zeros(64, 32, dtype=torch.bool))
    sw.select_kernel("tile")
    x = torch.randn(3, 32, requires_grad=True)
    y = sw(x, weight)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(3, 64)) and torch.equal(x.grad, torch.zeros(3, 32)) and torch.equal(weight.grad, torch.zeros(64, 32))
    assert sw(torch.randn(0, 32), weight).shape == (0, 64)
    half = torch.zeros(64, 32, dtype=torch.bool)
    half[:8] = True  # half of the first row of 16x16 tiles
    with pytest.raises(ValueError, match=r"the mask of weight 'w' \(shape \(64, 32\)\) is not constant on 16x16 tiles"):
        sw.set_mask(half)


def test_custom_ops_pass_opcheck():
    mask = tile_mask((48, 40), 16, 0.6)
    layout = TileLayout(mask, 16)
    w = (torch.randn(48, 40) * mask).requires_grad_()
    x = torch.randn(5, 40, requires_grad=True)
    probe = torch.empty(0)
    torch.library.opcheck(tile_linear, (x, w, mask, None, probe, *layout.for_use(False), 16, "cpu"))
    torch.library.opcheck(torch.ops.mst.tile_sddmm.default, (torch.randn(5, 48), torch.randn(5, 40), layout.rows, layout.cols, 16, "cpu"))


def test_compiled_forward_and_backward_match_eager():
    mask = tile_mask((64, 48), 16, 0.5)
    weight = torch.nn.Parameter(torch.randn(64, 48) * mask)
    sw = SparseWeight("w", weight)
    sw.use_tiles(16)
    sw.set_mask(mask)
    sw.select_kernel("tile")
    x = torch.randn(2, 7, 48)
    eager = sw(x, weight)
    eager.sum().backward()
    want = weight.grad.clone()
    weight.grad = None
    compiled = torch.compile(lambda x: sw(x, weight), backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(weight.grad, want)


def test_tile_helpers_against_loops():
    t = torch.randn(70, 45)
    norms = tile_norms(t, 16)
    for r in range(5):
        for c in range(3):
            assert norms[r, c].item() == pytest.approx(t[16 * r:16 * r + 16, 16 * c:16 * c + 16].norm().item(), rel=1e-5)
    m = tile_mask((70, 45), 16, 0.5, empty_row=False)
    assert is_tile_constant(m, 16) and torch.equal(expand(to_tiles(m, 16), (70, 45), 16), m)
    m[69, 44] = ~m[69, 44]  # one weight of an edge tile flipped
    assert not is_tile_constant(m, 16)


def test_kernel_choice():
    lo, hi = tile_crossover(32) / 2, min(1.0, tile_crossover(32) * 1.5)
    assert choose_tile_kernel("w", lo, "cpu", (768, 768), 32) == "tile"
    assert choose_tile_kernel("w", hi, "cpu", (768, 768), 32) == "dense"
    assert choose_tile_kernel("w", lo, "cpu", (768, 32), 32) == "dense"  # too small to pay off
    assert choose_tile_kernel("w", lo, "cuda", (768, 768), 32) == "dense"  # no crossover measured on a GPU yet
    assert choose_tile_kernel("w", hi, "cpu", (768, 768), 32, "tile") == "tile"
    assert choose_tile_kernel("w", lo, "cpu", (768, 768), 32, "dense") == "dense"


def test_triton_on_cpu_without_the_interpreter_is_one_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MstCompileError, match=r"weight 'h.0.fc' is on cpu: sparse_kernel='triton' .* set TRITON_INTERPRET=1") as e:
        choose_tile_kernel("h.0.fc", 0.1, "cpu", (768, 768), 32, "triton")
    assert "\n" not in str(e.value)
