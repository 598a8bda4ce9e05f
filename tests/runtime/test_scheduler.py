"""The scheduler inside an ordinary training loop: invariants after every step through all three phases."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _models import MLP, tiny_gpt

import mst_compile
from mst_compile.runtime.schedule import Schedule, drop_fraction, phase_at, target_sparsity

T, DT = 24, 3
CFG = mst_compile.MSTConfig(update_interval=DT, sparsity=0.8, final_sparsity=0.5, warmup_end=0.25,
                            ultra_end=0.75, drop_fraction=(0.5, 0.3, 0.2), distribution="er", attention_depth=1.0)
RUN = Schedule(CFG, T)


def _batches(seed=0, b=4, t=16, vocab=64):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (b, t + 1), generator=g)


def _lm_loss(sm, batch):
    logits = sm(batch[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _oracle_drop(w, mask, n):
    active = mask.reshape(-1).nonzero().squeeze(1)
    order = torch.argsort(w.reshape(-1).abs()[active], stable=True)
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    out[active[order[:n]]] = True
    return out


class Snapshot:
    """An optimizer post-hook registered before attach: it sees each step's state before MST does."""

    def __init__(self, sm, opt):
        self.sm, self.opt, self.seen = sm, opt, None
        opt.register_step_post_hook(self)

    def __call__(self, opt, args, kwargs):
        sws = self.sm.mst.sparse_weights()
        self.seen = {
            "masks": {n: m.clone() for n, m in self.sm.mst.masks().items()},
            "weights": {n: p.detach().clone() for n, p in self.sm.mst.parameters().items()},
            "grads": {n: (None if sws[n].dense_grad() is None else sws[n].dense_grad().clone()) for n in sws},
        }


def _check_invariants(sm, opt):
    mst = sm.mst
    counts = mst.allocation(mst.target_sparsity)
    for n, p in mst.parameters().items():
        m = mst.masks()[n]
        assert torch.all(p[~m] == 0), f"step {mst.step_count}: masked weights of {n} must be exactly zero"
        assert int(m.sum()) == counts[n], f"step {mst.step_count}: {n} has {int(m.sum())} active, target {counts[n]}"
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape:
                assert torch.all(v[~m] == 0), f"step {mst.step_count}: optimizer state {k} of {n} is not zero where masked"


def _counts(n_act, n_tgt, zeta, frac):
    """(n_prune, n_grow, n_grad) of docs/design.md §4 for one tensor."""
    n_prune = min(n_act, max(math.floor(zeta * n_act), n_act - n_tgt))
    n_grow = n_prune - (n_act - n_tgt)
    return n_prune, n_grow, math.floor(frac * n_grow + 0.5)


def _expected_probes(sm, k):
    """The weights that must form a dense gradient in iteration k: those the update after step k
    grows by gradient (no update runs at or after the last step T)."""
    run = sm.mst.schedule
    if k % run.config.update_interval or k >= run.total_steps:
        return set()
    counts = sm.mst.allocation(target_sparsity(k, run))
    zeta = drop_fraction(k, run)
    return {n for n, m in sm.mst.masks().items()
            if _counts(int(m.sum()), counts[n], zeta, run.config.grow_gradient_fraction)[2] > 0}


def _probing(sm):
    return {n for n, sw in sm.mst.sparse_weights().items() if sw.probe.dim() == 2}


def _check_update(sm, seen, frac):
    """The latest update against the schedule, the counting rule and a sort-based oracle."""
    mst, t = sm.mst, sm.mst.step_count
    u = mst.last_update
    assert u["step"] == t and u["phase"] == phase_at(t, RUN)
    zeta = drop_fraction(t, RUN)
    assert u["drop_fraction"] == pytest.approx(zeta) and u["target_sparsity"] == pytest.approx(target_sparsity(t, RUN))
    counts = mst.allocation(target_sparsity(t, RUN))
    pruned = grad_grown = rand_grown = 0
    for n, new in mst.masks().items():
        old, w, g = seen["masks"][n], seen["weights"][n], seen["grads"][n]
        n_prune, n_grow, n_grad = _counts(int(old.sum()), counts[n], zeta, frac)
        assert (g is not None) == (n_grad > 0), f"{n}: a dense gradient is formed exactly when the update grows by it"
        pruned, grad_grown, rand_grown = pruned + n_prune, grad_grown + n_grad, rand_grown + n_grow - n_grad
        after_drop = old.reshape(-1) & ~_oracle_drop(w, old, n_prune)
        free = (~after_drop).nonzero().squeeze(1)
        if n_grad:
            top = free[torch.argsort(g.reshape(-1).abs()[free], descending=True, stable=True)[:n_grad]]
            assert new.reshape(-1)[top].all(), f"{n}: the top-|grad| free positions must be grown"
        assert torch.equal(new.reshape(-1) & after_drop, after_drop), f"{n}: kept weights must stay active"
        assert int((new.reshape(-1) & ~after_drop).sum()) == n_grow
    assert (u["pruned"], u["grown_gradient"], u["grown_random"]) == (pruned, grad_grown, rand_grown)


@pytest.mark.parametrize("opt_name,frac", [("adamw", 0.75), ("sgd", 0.75), ("adamw", 1.0), ("adamw", 0.0)])
def test_invariants_through_all_three_phases(opt_name, frac):
    torch.manual_seed(0)
    cfg = CFG.replace(grow_gradient_fraction=frac)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=T, seed=3)
    opt = (torch.optim.AdamW(sm.parameters(), lr=1e-2, weight_decay=0.1) if opt_name == "adamw"
           else torch.optim.SGD(sm.parameters(), lr=0.1, momentum=0.9))
    snap = Snapshot(sm, opt)
    assert sm.mst.attach(opt) is sm.mst
    assert (sm.mst.step_count, sm.mst.phase, sm.mst.target_sparsity, sm.mst.last_update) == (0, "warmup", 0.0, None)
    data, phases, updates, probe_steps = _batches(), set(), 0, 0
    for _ in range(T):
        want_probes = _expected_probes(sm, sm.mst.step_count + 1)
        assert _probing(sm) == want_probes, f"probe state wrong before step {sm.mst.step_count + 1}"
        probe_steps += bool(want_probes)
        want = cfg.attention if sm.mst.phase in cfg.attention_phases else "dense"
        assert set(sm.mst.attention_patterns().values()) == {want}
        _lm_loss(sm, next(data)).backward()
        opt.step()
        opt.zero_grad()
        phases.add(sm.mst.phase)
        _check_invariants(sm, opt)
        if sm.mst.step_count % DT == 0 and sm.mst.step_count < T:
            _check_update(sm, snap.seen, frac)
            updates += 1
    assert phases == {"warmup", "ultra", "restoration"} and updates == (T - 1) // DT
    assert sm.mst.last_update["step"] == T - DT, "no update after the last optimizer step"
    assert (probe_steps > 0) == (frac > 0), "SET growth needs no dense gradient"
    # the run ends with the masks its last update (step 21) allocated, which the last step trained
    s_last = target_sparsity(T - DT, sm.mst.schedule)
    assert sm.mst.target_sparsity == pytest.approx(s_last) and sm.mst.density() == pytest.approx(1 - s_last, abs=1e-3)
    assert all(torch.equal(m, snap.seen["masks"][n]) for n, m in sm.mst.masks().items())
    u = sm.mst.last_update
    if frac == 1.0:  # RigL
        assert u["grown_random"] == 0 and u["grown_gradient"] > 0
    if frac == 0.0:  # SET
        assert u["grown_gradient"] == 0 and u["grown_random"] > 0
    assert 1 - s_last <= u["ever_active"] <= 1.0


def test_dense_gradient_is_the_full_gradient_of_the_step_before_the_update_with_accumulation():
    torch.manual_seed(0)
    model = MLP()
    cfg = mst_compile.MSTConfig(update_interval=4, schedule=[(0, 0.7), (8, 0.7)], distribution="uniform")
    sm = mst_compile.sparsify(model, cfg, total_steps=8)
    opt = torch.optim.Adam(sm.parameters(), lr=1e-2)
    snap = Snapshot(sm, opt)
    sm.mst.attach(opt)
    assert sm.mst.density() == pytest.approx(0.3, abs=1e-2), "a schedule that starts sparse starts sparse"
    g = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        ref = copy.deepcopy(model)  # the dense model at the current (masked) weights
        for _ in range(2):  # gradient accumulation: two micro-batches per optimizer step
            x, y = torch.randn(6, 16, generator=g), torch.randn(6, 8, generator=g)
            F.mse_loss(sm(x), y).backward()
            F.mse_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step == 4:  # the only update: none runs after the last step (8)
            for n, grad in snap.seen["grads"].items():
                torch.testing.assert_close(grad, dict(ref.named_parameters())[n].grad, msg=f"dense gradient of {n}")
        else:
            assert all(g_ is None for g_ in snap.seen["grads"].values())
        _check_invariants(sm, opt)
    assert sm.mst.flops.tokens == 8 * 2 * 6


def test_static_sparsity_with_zero_drop_fraction_never_moves():
    cfg = mst_compile.MSTConfig(update_interval=2, schedule=[(0, 0.6), (12, 0.6)], drop_fraction=0.0)
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=12)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    start = {n: m.clone() for n, m in sm.mst.masks().items()}
    for batch, _ in zip(_batches(), range(12)):
        _lm_loss(sm, batch).backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(m, start[n]) for n, m in sm.mst.masks().items())
    assert sm.mst.last_update["pruned"] == 0 and sm.mst.last_update["grown_gradient"] == 0


def test_grad_scaler_skipped_step_is_not_counted_and_stale_gradient_is_dropped():
    cfg = mst_compile.MSTConfig(update_interval=3, schedule=[(0, 0.5), (9, 0.5)], grow_gradient_fraction=1.0)
    torch.manual_seed(0)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=9)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    snap = Snapshot(sm, opt)
    sm.mst.attach(opt)
    data = _batches()
    good = 0
    for i in range(11):
        loss = _lm_loss(sm, next(data))
        if i in (2, 6):  # the steps right before updates overflow and are skipped by the scaler
            loss = loss * float("inf")
        else:
            good += 1
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert sm.mst.step_count == good
        _check_invariants(sm, opt)
        if sm.mst.step_count in (3, 6) and i not in (2, 6):  # updates after steps 3 and 6, none after the last (9)
            assert sm.mst.last_update["step"] == sm.mst.step_count
            assert not sm.mst.last_update["gradient_fallback"], "a stale inf gradient must not reach the update"
            assert all(torch.isfinite(g).all() for g in snap.seen["grads"].values())
    assert sm.mst.step_count == 9


def test_stepping_past_total_steps_warns_once_and_holds():
    cfg = mst_compile.MSTConfig(update_interval=1, warmup_end=0.0, ultra_end=0.5, sparsity=0.7, final_sparsity=0.6)
    sm = mst_compile.sparsify(MLP(), cfg, total_steps=4)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.mst.attach(opt)
    x = torch.randn(4, 16)
    for _ in range(4):
        sm(x).square().mean().backward()
        opt.step()
    final = {n: m.clone() for n, m in sm.mst.masks().items()}
    with pytest.warns(UserWarning, match="past total_steps=4") as rec:
        for _ in range(5):
            sm(x).square().mean().backward()
            opt.step()
    assert len([w for w in rec if "past total_steps" in str(w.message)]) == 1
    assert sm.mst.step_count == 9 and sm.mst.phase == "restoration"
    assert sm.mst.target_sparsity == pytest.approx(target_sparsity(3, sm.mst.schedule)) and sm.mst.last_update["step"] == 3
    assert all(torch.equal(m, final[n]) for n, m in sm.mst.masks().items())
    assert all(sw.probe.dim() != 2 for sw in sm.mst.sparse_weights().values())


def test_bad_input():
    sm = mst_compile.sparsify(MLP(), {"update_interval": 1}, total_steps=10)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got list"):
        sm.mst.attach([opt])
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold the sparse weights \['fc1.weight', 'fc2.weight'\]"):
        sm.mst.attach(other)
    partial = torch.optim.SGD([sm.get_parameter("fc1.weight")], lr=0.1)
    with pytest.raises(ValueError, match=r"\['fc2.weight'\]"):
        sm.mst.attach(partial)
    sm.mst.attach(opt)
    with pytest.raises(mst_compile.MstCompileError, match="already attached"):
        sm.mst.attach(opt)
    sm.mst.detach()
    sm.mst.attach(torch.optim.Adam(sm.parameters()))  # switching optimizers after detach is fine
    # the schedule is checked by sparsify, before anything is captured
    with pytest.raises(ValueError, match="past total_steps=10"):
        mst_compile.sparsify(MLP(), {"schedule": [(0, 0.0), (20, 0.5)]}, total_steps=10)
    with pytest.raises(ValueError, match="update_interval=50: the ultra phase .* no topology update"):
        mst_compile.sparsify(MLP(), {"update_interval": 50}, total_steps=10)
    unscheduled = mst_compile.sparsify(MLP())  # no run length: inspectable, not trainable
    with pytest.raises(mst_compile.MstCompileError, match=r"run length is unknown.*total_steps=T"):
        unscheduled.mst.attach(torch.optim.SGD(unscheduled.parameters(), lr=0.1))


def test_detach_stops_mst():
    sm = mst_compile.sparsify(MLP(), {"update_interval": 1, "warmup_end": 0.0, "ultra_end": 1.0}, total_steps=10)
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sm.mst.attach(opt)
    sm(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert sm.mst.step_count == 1
    sm.mst.detach()
    sm(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert sm.mst.step_count == 1 and sm.mst.flops.steps == 1


@pytest.mark.slow
def test_torch_compile_runs_mst():
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.0, ultra_end=1.0, sparsity=0.7)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=6)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    compiled = torch.compile(sm)
    for batch, _ in zip(_batches(), range(6)):
        _lm_loss(compiled, batch).backward()
        opt.step()
        opt.zero_grad()
        _check_invariants(sm, opt)
        assert sm.mst.flops.last_step_tokens == batch[:, :-1].numel()
        if sm.mst.step_count % 2 == 0:
            assert not sm.mst.last_update["gradient_fallback"], "the compiled backward must deliver the dense gradient"
    assert sm.mst.last_update["step"] == 4
    x = next(_batches())[:, :-1]
    torch.testing.assert_close(compiled(x), sm(x))


def _linear_charge(sm, rows):
    """One iteration's linear FLOPs by docs/design.md §6: 6·d·n_in·n_out per row, + 2·(1 − d)·n_in·n_out on a probe step."""
    probing, dens = _probing(sm), sm.mst.densities()
    return sum(rows * p.numel() * (6 * dens[n] + (2 * (1 - dens[n]) if n in probing else 0))
               for n, p in sm.mst.parameters().items())


def test_no_topology_update_at_or_after_the_last_step():
    cfg = mst_compile.MSTConfig(update_interval=4, warmup_end=0.0, ultra_end=0.5, sparsity=0.8,
                                final_sparsity=0.5, distribution="uniform")
    torch.manual_seed(0)
    sm = mst_compile.sparsify(MLP(), cfg, total_steps=12)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    probed, charged, trained = [], [], None
    for step in range(1, 13):
        probed += [step] if _probing(sm) else []
        trained = {n: m.clone() for n, m in sm.mst.masks().items()}
        want = _linear_charge(sm, rows=4)
        sm(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert sm.mst.flops.last_step_mst == pytest.approx(want, rel=1e-12), f"step {step}"
        charged.append(sm.mst.flops.last_step_mst)
    assert probed == [4, 8], "the last iteration forms no dense gradient: no update follows it"
    assert sm.mst.last_update["step"] == 8
    assert charged[11] == charged[10] and charged[7] > charged[6], "step 12 is charged as a plain step"
    # what the run reports at the end is what its last optimizer step trained
    assert all(torch.equal(m, trained[n]) for n, m in sm.mst.masks().items())
    s8 = target_sparsity(8, sm.mst.schedule)
    assert s8 == pytest.approx(cfg.final_sparsity) and sm.mst.target_sparsity == pytest.approx(s8)  # the last update lands s_end
    assert sm.mst.density() == pytest.approx(1 - s8, abs=0.02)
    assert all(d == pytest.approx(1 - s8, abs=0.02) for d in sm.mst.densities().values())


@pytest.mark.parametrize("case", ["static", "set", "growing"])
def test_nothing_to_grow_takes_no_probe_steps(case):
    """Drop fraction 0 and no density increase (the static baseline), or SET growth: no dense gradient
    is ever formed and the ledger charges none. A scheduled density increase does need one."""
    kw = {"static": dict(schedule=[(0, 0.6), (12, 0.6)], drop_fraction=0.0),
          "set": dict(schedule=[(0, 0.6), (12, 0.6)], grow_gradient_fraction=0.0),
          "growing": dict(schedule=[(0, 0.8), (12, 0.4)], drop_fraction=0.0)}[case]
    cfg = mst_compile.MSTConfig(update_interval=2, distribution="uniform", **kw)
    torch.manual_seed(0)
    sm = mst_compile.sparsify(MLP(), cfg, total_steps=12)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    start = {n: m.clone() for n, m in sm.mst.masks().items()}
    probe_steps, want = 0, 0.0
    for _ in range(12):
        probe_steps += bool(_probing(sm))
        want += _linear_charge(sm, rows=4)
        sm(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert sm.mst.flops.linear_mst == pytest.approx(want, rel=1e-12)
    moved = any(not torch.equal(m, start[n]) for n, m in sm.mst.masks().items())
    if case == "static":
        assert probe_steps == 0 and not moved
        dens = sm.mst.densities()
        plain = 12 * sum(4 * p.numel() * 6 * dens[n] for n, p in sm.mst.parameters().items())
        assert sm.mst.flops.linear_mst == pytest.approx(plain, rel=1e-12), "no dense-gradient FLOPs charged"
    elif case == "set":
        assert probe_steps == 0 and moved and not sm.mst.last_update["gradient_fallback"]
    else:
        assert probe_steps == 5 and sm.mst.last_update["grown_gradient"] > 0  # updates 2, 4, ..., 10
