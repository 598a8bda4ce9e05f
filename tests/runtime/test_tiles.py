"""Tile-structured MST (MSTConfig.tile) against dense-mask oracles: the exact tile budget, the
Mixed-Growing update by tile, training through all three phases (masks tile-constant after every
update, active tiles == target, w == 0 off the mask), bitwise resume, the ledger, and bad input."""
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _models import tiny_gpt

import mst_compile
from mst_compile.errors import CheckpointError, MstCompileError
from mst_compile.ops import tile_cpu
from mst_compile.ops.tile_layout import is_tile_constant
from mst_compile.runtime.density import allocate
from mst_compile.runtime.schedule import target_sparsity
from mst_compile.runtime.topology import mixed_growing, prune_grow_counts

SHAPES = {"qkv": (96, 32), "proj": (32, 32), "fc": (128, 32), "out": (32, 128), "head": (64, 32), "edge": (70, 45)}
T, DT = 24, 2
CFG = mst_compile.MSTConfig(update_interval=DT, warmup_end=0.25, ultra_end=0.75, sparsity=0.8,
                            final_sparsity=0.5, tile=8)


def _grid_tiles(shape, b):
    """The tiles of a weight as slices, by explicit loops (the oracle's own geometry)."""
    R, C = shape
    return [[(slice(r, min(r + b, R)), slice(c, min(c + b, C))) for c in range(0, C, b)] for r in range(0, R, b)]


@pytest.mark.parametrize("dist", ["uniform", "er"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("b", [8, 16, 32])
def test_allocation_is_an_exact_tile_budget(dist, s, b):
    counts = allocate(SHAPES, s, dist, tile=b)
    tiles = {n: sum(len(row) for row in _grid_tiles(shape, b)) for n, shape in SHAPES.items()}
    assert sum(counts.values()) == round((1 - s) * sum(tiles.values()))
    assert all(0 <= counts[n] <= tiles[n] for n in SHAPES)


def test_er_over_tiles_follows_the_weights_shapes():
    counts = allocate(SHAPES, 0.8, "er", tile=8)
    d = {n: counts[n] / (math.ceil(o / 8) * math.ceil(i / 8)) for n, (o, i) in SHAPES.items()}
    eps = d["fc"] / ((128 + 32) / (128 * 32))
    for n in ("qkv", "out", "head"):
        o, i = SHAPES[n]
        assert d[n] == pytest.approx(eps * (o + i) / (o * i), abs=1.5 / (math.ceil(o / 8) * math.ceil(i / 8)))


@pytest.mark.parametrize("s", [0.5, 0.8, 0.95])
def test_allocation_of_tiles_and_one_weight_masked_by_element(s):
    """A tied embedding keeps element masks among tiled weights: one ER ε over both, in weights."""
    edges = {**dict.fromkeys(SHAPES, 8), "head": None}
    counts = allocate(SHAPES, s, "er", tile=edges)
    tiles = {n: math.ceil(o / 8) * math.ceil(i / 8) for n, (o, i) in SHAPES.items()}
    weights = {n: 64 * tiles[n] if edges[n] else o * i for n, (o, i) in SHAPES.items()}  # edge tiles counted whole
    active = sum(64 * c if edges[n] else c for n, c in counts.items())
    assert abs(active - (1 - s) * sum(weights.values())) <= 64  # on target within one tile
    eps = counts["fc"] / tiles["fc"] / ((128 + 32) / (128 * 32))
    assert counts["head"] / (64 * 32) == pytest.approx(eps * (64 + 32) / (64 * 32), abs=0.02)
    assert allocate(SHAPES, s, "er", tile=dict.fromkeys(SHAPES, 8)) == allocate(SHAPES, s, "er", tile=8)


@pytest.mark.parametrize("n_target,zeta,frac", [(30, 0.3, 0.75), (20, 0.3, 1.0), (40, 0.2, 0.75), (30, 0.5, 0.0)])
def test_tile_update_matches_a_dense_mask_oracle(n_target, zeta, frac):
    shape, b = (70, 45), 8  # edge tiles on both sides
    tiles = _grid_tiles(shape, b)
    g = torch.Generator().manual_seed(0)
    tmask = torch.rand(len(tiles), len(tiles[0]), generator=g) < 0.4
    mask = torch.zeros(shape, dtype=torch.bool)
    for r, row in enumerate(tiles):
        for c, (rs, cs) in enumerate(row):
            mask[rs, cs] = tmask[r, c]
    w = torch.randn(shape, generator=g) * mask
    grad = torch.randn(shape, generator=g)
    ch = mixed_growing(w, mask, grad, n_target, zeta, frac, torch.Generator().manual_seed(1), tile=b)
    new = ch.mask.view(shape)

    flat = [(r, c) for r in range(len(tiles)) for c in range(len(tiles[0]))]
    wn = {t: w[tiles[t[0]][t[1]]].norm().item() for t in flat}
    gn = {t: grad[tiles[t[0]][t[1]]].norm().item() for t in flat}
    active = [t for t in flat if tmask[t]]
    n_prune, n_grow = prune_grow_counts(len(active), n_target, zeta)
    dropped = set(sorted(active, key=lambda t: wn[t])[:n_prune])
    free = [t for t in flat if t not in set(active) - dropped]
    n_grad = math.floor(frac * n_grow + 0.5)
    by_grad = set(sorted(free, key=lambda t: -gn[t])[:n_grad])
    assert (ch.n_prune, ch.n_grow_gradient, ch.n_grow_random) == (n_prune, n_grad, n_grow - n_grad)
    assert is_tile_constant(new, b)
    on = {t for t in flat if bool(new[tiles[t[0]][t[1]]].all())}
    assert len(on) == n_target
    assert (set(active) - dropped) | by_grad <= on  # kept tiles stay, the top-gradient free tiles grow
    assert len(on - ((set(active) - dropped) | by_grad)) == n_grow - n_grad  # the rest at random


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 64, (4, 17), generator=g)


def _step(sm, opt, batch):
    logits = sm(batch[:, :-1])  # (B, T, vocab)
    F.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


def _kernels():
    return ["dense", "tile"] if tile_cpu.available() else ["dense"]


@pytest.mark.parametrize("kernel", _kernels())
def test_training_keeps_masks_tiled_and_on_target_through_all_phases(kernel):
    torch.manual_seed(0)
    cfg = CFG.replace(sparse_kernel=kernel)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=T, seed=3)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2, weight_decay=0.1)
    sm.mst.attach(opt)
    tiled = {n: s for n, s in sm.mst.weight_sites.items() if n != "wte.weight"}
    assert {s.sparse.kernel for s in tiled.values()} == {kernel} and {s.sparse.tile for s in tiled.values()} == {8}
    # the tied head: one mask for the lookup and the matmul, by weight (tiles would blank blocks of its rows)
    emb = sm.mst.weight_sites["wte.weight"]
    assert emb.sparse.tile is None and emb.sparse.kernel in ("dense", "csr")
    phases, data = set(), _batches()
    for _ in range(T):
        linear_before = sm.mst.flops.linear_mst
        _step(sm, opt, next(data))
        phases.add(sm.mst.phase)
        for n, s in sm.mst.weight_sites.items():
            assert n not in tiled or is_tile_constant(s.mask, 8), f"{n}: mask not constant on its tiles"
            assert torch.all(s.param[~s.mask] == 0), f"{n}: a masked weight is not zero"
        if sm.mst.step_count % DT == 0 and sm.mst.step_count < T:
            target = target_sparsity(sm.mst.step_count, sm.mst.schedule)
            want = sm.mst.allocation(target)
            assert {n: s.active_units() for n, s in sm.mst.weight_sites.items()} == want
            active = {n: int(s.mask.sum()) for n, s in sm.mst.weight_sites.items()}
            assert active == {n: (64 if n in tiled else 1) * c for n, c in want.items()}
            total = sum(s.param.numel() for s in sm.mst.weight_sites.values())  # on target within one tile
            assert abs(sum(active.values()) - (1 - target) * total) <= 64
    assert phases == {"warmup", "ultra", "restoration"}
    assert sm.mst.last_update["grown_gradient"] + sm.mst.last_update["grown_random"] > 0
    # the ledger charges the tile density by the same formula, 6·d·n_in·n_out per row (the last step forms no dense gradient)
    dens = {n: s.active() / s.param.numel() for n, s in sm.mst.weight_sites.items()}
    want = sum(4 * 16 * 6 * dens[n] * p.numel() for n, p in sm.mst.parameters().items())
    assert sm.mst.flops.linear_mst - linear_before == pytest.approx(want, rel=1e-9)


def test_tile_kernel_trains_like_the_masked_dense_op():
    if not tile_cpu.available():
        pytest.skip("the blocked CPU tile kernel could not be built here")
    runs = {}
    for kernel in ("dense", "tile"):
        torch.manual_seed(0)
        sm = mst_compile.sparsify(tiny_gpt(), CFG.replace(sparse_kernel=kernel, warmup_end=0.25), total_steps=12, seed=3)
        opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
        sm.mst.attach(opt)
        data = _batches()
        for _ in range(8):
            _step(sm, opt, next(data))
        runs[kernel] = sm
    a, b = runs["dense"].mst, runs["tile"].mst
    assert all(torch.equal(m, b.masks()[n]) for n, m in a.masks().items())
    for n, p in a.parameters().items():
        torch.testing.assert_close(p, b.parameters()[n], rtol=1e-4, atol=1e-5)


def _fresh(init_seed, cfg):
    torch.manual_seed(init_seed)
    model = tiny_gpt()
    sm = mst_compile.sparsify(model, cfg, total_steps=T, seed=3)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2, weight_decay=0.1)
    sm.mst.attach(opt)
    return model, sm, opt


@pytest.mark.parametrize("kernel", _kernels())
def test_resume_is_bitwise_identical(kernel):
    cfg, n = CFG.replace(sparse_kernel=kernel, grow_gradient_fraction=0.25), T // 2
    data = [b for b, _ in zip(_batches(), range(T))]
    model_a, sm_a, opt_a = _fresh(0, cfg)
    for b in data:
        _step(sm_a, opt_a, b)
    model_b, sm_b, opt_b = _fresh(0, cfg)
    for b in data[:n]:
        _step(sm_b, opt_b, b)
    assert sm_b.mst.last_update["grown_random"] > 0
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "mst": sm_b.mst.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model_c, sm_c, opt_c = _fresh(123, cfg)
    model_c.load_state_dict(ck["model"])
    sm_c.mst.load_state_dict(ck["mst"])
    opt_c.load_state_dict(ck["opt"])
    for b in data[n:]:
        _step(sm_c, opt_c, b)
    assert all(torch.equal(m, sm_c.mst.masks()[k]) for k, m in sm_a.mst.masks().items())
    params_c = dict(model_c.named_parameters())
    assert all(torch.equal(p, params_c[k]) for k, p in model_a.named_parameters())
    assert sm_a.mst.last_update == sm_c.mst.last_update


def test_set_sparsity_keeps_the_largest_tiles():
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=T, seed=3)
    sm.mst.set_sparsity(0.75)
    for n, s in sm.mst.weight_sites.items():
        if n == "wte.weight":  # the tied embedding keeps its largest weights, one by one
            kept = s.param[s.mask].abs()
            assert len(kept) == sm.mst.allocation(0.75)[n] and kept.min() >= s.param[~s.mask].abs().max()
            continue
        norms = [(s.param[r:r + 8, c:c + 8].norm().item(), bool(s.mask[r, c])) for r in range(0, s.shape[0], 8)
                 for c in range(0, s.shape[1], 8)]
        kept = [v for v, on in norms if on]
        assert is_tile_constant(s.mask, 8) and len(kept) == sm.mst.allocation(0.75)[n]
        assert not kept or min(kept) >= max((v for v, on in norms if not on), default=0.0)


def test_unstructured_masks_do_not_load_into_a_tiled_run():
    torch.manual_seed(0)
    plain = mst_compile.sparsify(tiny_gpt(), CFG.replace(tile=None), total_steps=T, seed=3)
    plain.mst.set_sparsity(0.5)
    _, sm, _ = _fresh(0, CFG)
    with pytest.raises(CheckpointError, match=r"the mask of weight '[\w.]+' \(shape \(\d+, \d+\)\) is not constant on 8x8 tiles") as e:
        sm.mst.load_state_dict(plain.mst.state_dict())
    assert "\n" not in str(e.value)
    assert all(s.mask.all() for s in sm.mst.weight_sites.values()), "nothing is changed by a refused checkpoint"


def test_bad_input_is_one_line_naming_what_to_do(monkeypatch):
    for kw, want in [(dict(tile=12), r"MSTConfig.tile=12 is invalid: expected None \(unstructured masks\) or one of 8, 16, 32, 64, 128"),
                     (dict(tile=32, sparse_kernel="csr"), r"sparse_kernel='csr' .* CSR kernels are for unstructured masks; use sparse_kernel='tile'"),
                     (dict(sparse_kernel="tile"), r"sparse_kernel='tile' .* set tile \(e.g. tile=32, --tile 32\)")]:
        with pytest.raises(ValueError, match=want) as e:
            mst_compile.MSTConfig(**kw)
        assert "\n" not in str(e.value)
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sm = mst_compile.sparsify(tiny_gpt(), CFG.replace(sparse_kernel="triton"), total_steps=T, seed=3)
    with pytest.raises(MstCompileError, match=r"weight '[\w.]+' is on cpu: sparse_kernel='triton' runs Triton kernels, which need a CUDA"):
        sm.mst.attach(torch.optim.AdamW(sm.parameters()))


def test_onnx_export_folds_tile_masks(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), CFG, total_steps=T, seed=3)
    sm.mst.set_sparsity(0.75)
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    res = mst_compile.export_onnx(sm, tmp_path / "tiles.onnx", (x,))  # validated against PyTorch in onnxruntime
    assert max(res.max_diff.values()) <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not tile_cpu.available(), reason="the blocked CPU tile kernel could not be built here")
def test_hf_gpt2_trains_on_the_tile_kernel_and_exports(tmp_path):
    """HF GPT-2 stores its Conv1D weights (in, out): the tile kernel runs them transposed; the folder round-trips."""
    pytest.importorskip("transformers")
    from _models import hf_gpt2
    from transformers import AutoModelForCausalLM

    from mst_compile.export import export_hf

    torch.manual_seed(0)
    model = hf_gpt2()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    cfg = CFG.replace(warmup_end=0.25, ultra_end=0.75, sparse_kernel="tile", attention_phases=("ultra",))
    sm = mst_compile.sparsify(model, cfg, total_steps=12, seed=3, example_inputs={"input_ids": x})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    tiled = {n: s for n, s in sm.mst.weight_sites.items() if n != "transformer.wte.weight"}  # the tied head by weight
    assert {s.sparse.kernel for s in tiled.values()} == {"tile"}
    g = torch.Generator().manual_seed(2)
    for _ in range(10):  # ends in restoration: dense attention, as the exported model runs
        b = torch.randint(0, 64, (4, 17), generator=g)
        F.cross_entropy(sm(input_ids=b[:, :-1]).logits.reshape(-1, 64), b[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    assert sm.mst.density() < 0.6 and all(is_tile_constant(s.mask, 8) for s in tiled.values())
    sm.eval()
    with torch.no_grad():
        want = sm(input_ids=x).logits
    loaded = AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf", sm)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_inspect_shows_tile_densities(tmp_path):
    from click.testing import CliRunner

    from mst_compile.cli import main

    f = tmp_path / "m.py"
    here = str(Path(__file__).resolve().parents[1])
    f.write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom _models import tiny_gpt\nimport mst_compile\n\n"
                 "def model():\n    return tiny_gpt()\n\ndef config():\n    return mst_compile.MSTConfig(tile=16)\n")
    r = CliRunner().invoke(main, ["inspect", str(f), "--sparsity", "0.75"])
    assert r.exit_code == 0, r.output
    assert "constant on 16x16 tiles" in r.output
    row = [ln for ln in r.output.splitlines() if ln.startswith("h.0.mlp.0.weight")][0]  # 128x32: 16 tiles
    assert float(row.split()[4]) * 16 == pytest.approx(round(float(row.split()[4]) * 16))  # a whole number of tiles


def test_the_tile_flag_reaches_the_config_and_the_plan(tmp_path):
    import json

    from _train_models import TINY, write
    from click.testing import CliRunner

    from mst_compile.cli import main
    from mst_compile.train.options import build_configs

    assert build_configs(None, {}, None, {}, {"tile": 16})[1].tile == 16
    f = write(tmp_path, "tiny.py", TINY)
    r = CliRunner().invoke(main, ["plan", str(f), "--tokens", "100000", "--tile", "16", "--hardware", "h100", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output[r.output.index("{"):])
    assert plan["config"]["tile"] == 16 and "tile-sparse linears (Triton) measured slower" in plan["hardware"]["kernels"]
    r = CliRunner().invoke(main, ["plan", str(f), "--tokens", "100000", "--tile", "12"])
    assert r.exit_code == 2 and "--tile 12 is invalid" in r.output  # the flag as typed


@pytest.mark.slow
@pytest.mark.skipif(not tile_cpu.available(), reason="the blocked CPU tile kernel could not be built here")
def test_compiled_tiled_step_does_not_recompile_at_updates_of_the_same_size():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    # ultra only (tile counts stay); ζ = 1 and RigL growth so every weight grows by gradient at every update up to
    # step 14: each distinct set of probed weights is a graph variant of its own (docs/design.md §9)
    cfg = CFG.replace(warmup_end=0.0, ultra_end=1.0, sparse_kernel="tile", drop_fraction=1.0,
                      grow_gradient_fraction=1.0)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=20, seed=3)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sm, backend="aot_eager")
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    graphs, masks = {}, {}
    for _ in range(16):
        F.cross_entropy(compiled(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        graphs[sm.mst.step_count] = counters["stats"]["unique_graphs"]
        masks[sm.mst.step_count] = torch.cat([m.flatten() for m in sm.mst.masks().values()])
    assert not torch.equal(masks[6], masks[14]), "the masks should change between steps 6 and 14"
    assert graphs[14] == graphs[6], f"recompiled between steps 6 and 14: {graphs}"
    torch.testing.assert_close(compiled(x[:, :-1]), sm(x[:, :-1]))
