"""Mixed-Growing update of one tensor against a sort-based oracle, and the optimizer-state reset."""
import math

import pytest
import torch

from mst_compile.runtime.topology import apply_change, gradient_share, mixed_growing, prune_grow_counts


def _case(shape=(40, 30), density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    w = torch.randn(shape, generator=g) * mask
    grad = torch.randn(shape, generator=g)
    return w, mask, grad


def _oracle_drop(w, mask, n_prune):
    """The n_prune active positions of smallest |w|, by a full stable sort."""
    flat_w, flat_m = w.reshape(-1).abs(), mask.reshape(-1)
    active = flat_m.nonzero().squeeze(1)
    order = torch.argsort(flat_w[active], stable=True)
    dropped = torch.zeros_like(flat_m)
    dropped[active[order[:n_prune]]] = True
    return dropped


def _oracle_grad_grow(grad, free, n_grad):
    idx = free.nonzero().squeeze(1)
    order = torch.argsort(grad.reshape(-1).abs()[idx], descending=True, stable=True)
    out = torch.zeros_like(free)
    out[idx[order[:n_grad]]] = True
    return out


def test_counts_follow_the_target_tracking_rule():
    assert prune_grow_counts(100, 100, 0.3) == (30, 30)  # steady: swap ζ·n_act
    assert prune_grow_counts(100, 50, 0.3) == (50, 0)  # sparsifying faster than ζ: prune Δ, grow none
    assert prune_grow_counts(100, 90, 0.3) == (30, 20)  # Δ = 10 < ⌊ζ·n⌋
    assert prune_grow_counts(100, 150, 0.3) == (30, 80)  # densifying: grow Δ more than pruned
    assert prune_grow_counts(100, 100, 0.0) == (0, 0)  # static
    assert prune_grow_counts(7, 7, 0.5) == (3, 3)  # floor
    assert [gradient_share(n, 0.75) for n in (0, 1, 2, 4, 6)] == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("n_target,zeta", [(360, 0.3), (300, 0.3), (420, 0.2), (360, 0.0), (200, 1.0)])
@pytest.mark.parametrize("frac", [0.75, 1.0, 0.0])
def test_mixed_growing_matches_oracle(n_target, zeta, frac):
    w, mask, grad = _case()
    n_act = int(mask.sum())
    change = mixed_growing(w, mask, grad, n_target, zeta, frac, torch.Generator().manual_seed(1))
    n_prune, n_grow = prune_grow_counts(n_act, n_target, zeta)
    assert change.n_prune == n_prune == max(math.floor(zeta * n_act), n_act - n_target)
    assert int(change.mask.sum()) == n_target
    n_grad = math.floor(frac * n_grow + 0.5)
    assert (change.n_grow_gradient, change.n_grow_random) == (n_grad, n_grow - n_grad)

    dropped = _oracle_drop(w, mask, n_prune)
    after_drop = mask.reshape(-1) & ~dropped
    by_grad = _oracle_grad_grow(grad, ~after_drop, n_grad)
    assert torch.equal(change.by_gradient, by_grad), "gradient growth must pick the largest |grad| free positions"
    random_part = change.mask & ~after_drop & ~by_grad
    assert int(random_part.sum()) == n_grow - n_grad
    assert torch.equal(change.mask & ~random_part, after_drop | by_grad)
    # what really changed
    assert torch.equal(change.dropped, mask.reshape(-1) & ~change.mask)
    assert torch.equal(change.grown, ~mask.reshape(-1) & change.mask)
    assert change.regrown == int((dropped & change.mask).sum())


def test_random_growth_is_seeded_uniform_and_disjoint_from_gradient_growth():
    w, mask, grad = _case(shape=(60, 50), density=0.2)
    a = mixed_growing(w, mask, grad, int(mask.sum()), 0.3, 0.0, torch.Generator().manual_seed(5))
    b = mixed_growing(w, mask, grad, int(mask.sum()), 0.3, 0.0, torch.Generator().manual_seed(5))
    c = mixed_growing(w, mask, grad, int(mask.sum()), 0.3, 0.0, torch.Generator().manual_seed(6))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    # SET: the grown positions are not the top-|grad| ones; their |grad| looks like any free position's
    free = ~(mask.reshape(-1) & ~a.dropped)
    grown = a.mask & free
    assert grown.sum() > 100
    top = _oracle_grad_grow(grad, free, int(grown.sum()))
    assert (grown & top).sum() < 0.5 * grown.sum()
    mean_free = float(grad.reshape(-1).abs()[free].mean())
    assert float(grad.reshape(-1).abs()[grown].mean()) == pytest.approx(mean_free, rel=0.2)


def test_non_finite_or_missing_gradient_falls_back_to_random_growth():
    w, mask, grad = _case()
    grad[0, 0] = float("inf")
    for g in (grad, None):
        change = mixed_growing(w, mask, g, int(mask.sum()), 0.3, 0.75, torch.Generator().manual_seed(0))
        assert change.gradient_fallback and change.n_grow_gradient == 0
        assert change.n_grow_random == change.n_prune and int(change.mask.sum()) == int(mask.sum())


def test_mixed_growing_changes_nothing_it_reads():
    w, mask, grad = _case()
    w0, m0, g0 = w.clone(), mask.clone(), grad.clone()
    mixed_growing(w, mask, grad, 300, 0.3, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(w, w0) and torch.equal(mask, m0) and torch.equal(grad, g0)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_apply_change_zeroes_weights_and_optimizer_state(opt_name):
    w, mask, grad = _case()
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], lr=0.1) if opt_name == "adamw" else torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p) * mask
    opt.step()
    with torch.no_grad():
        p.mul_(mask)
    # make one dropped weight come straight back: a huge gradient where the smallest active weight is
    smallest = _oracle_drop(p.detach(), mask, 1).nonzero().item()
    grad.view(-1)[smallest] = 1e6
    before = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
    w_before = p.detach().clone()
    change = mixed_growing(p, mask, grad, int(mask.sum()), 0.3, 1.0, torch.Generator().manual_seed(0))
    assert change.by_gradient[smallest] and change.mask[smallest] and change.regrown >= 1
    apply_change(p, change, opt)
    new = change.mask.view_as(p)
    reset = (~change.mask | change.grown).view_as(p)
    assert torch.all(p[~new] == 0) and torch.all(p.view(-1)[change.grown] == 0)
    keep = new & ~change.grown.view_as(p)
    assert torch.equal(p.detach()[keep], w_before[keep]), "surviving weights keep their value"
    assert p.view(-1)[smallest] == w_before.view(-1)[smallest], "a regrown weight keeps its value"
    assert before, "the optimizer must have state to reset"
    for k, v in opt.state[p].items():
        if k in before:
            assert torch.all(v[reset] == 0), f"{k} must be zero on dropped and grown weights"
            assert torch.equal(v[~reset], before[k][~reset]), f"{k} is untouched elsewhere"
