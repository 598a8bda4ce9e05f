"""What the loop trains and how it counts: the sparsified module (MST) or the plain captured one (dense).

Both modes report the same numbers (phase, density, attention patterns, cumulative FLOPs), so an
MST run and its dense baseline land in comparable metrics. MST's FLOPs come from the runtime's
ledger; the dense run counts with the same per-token formula at density 1 and dense causal
attention, so "dense FLOPs" means the same thing in both runs.
"""
from __future__ import annotations

import hashlib

import torch

from ..capture import quiet_torch
from ..errors import CheckpointError


def build(model, mst_config, tc, example_inputs, batch, d, blocks: str | None = "auto") -> Accounting:
    """The module the loop trains, with its accounting: ``model`` sparsified (MST) or captured as it is
    (the dense baseline, whose FLOPs per token are measured once on ``batch``, the forward's inputs
    for a (B, T) batch as ``ModelFile.inputs_for`` packs them), moved to the device. ``blocks``: as
    ``sparsify`` takes it (``--fsdp`` names the path, so a model it cannot capture per block is refused)."""
    with quiet_torch():
        if tc.dense:
            from ..capture import capture

            module, _ = capture(model, example_inputs)
            acct: Accounting = DenseAccounting(module, d.world, dense_flops_per_token(model, mst_config, example_inputs, batch))
        else:
            from ..api import sparsify

            # the one place the trainer passes the run's length and seed to MST
            sm = sparsify(model, mst_config, total_steps=tc.schedule_steps, seed=tc.seed, example_inputs=example_inputs,
                          blocks=blocks)
            acct = MSTAccounting(sm, d.world)
    acct.module.to(d.device)
    return acct


class Accounting:
    """What a run reports about its module: the dense baseline's figures (``MSTAccounting`` has MST's).

    Both keep the checkpoint format ``{"dense", "tokens", "dense_total", "mst"}`` that export reads
    (under FSDP2 ``state_dict`` is a collective that gathers the whole masks).
    """

    dense = True
    mst = None  # the runtime handle sm.mst of an MST run

    def __init__(self, module, world: int):
        self.module, self.world, self.tokens = module, world, 0

    def attach(self, optimizer) -> None:
        pass

    def after_step(self, tokens: int) -> None:
        self.tokens += tokens

    # -- what the run is doing --------------------------------------------------------------
    @property
    def phase(self) -> str:
        return "dense"

    @property
    def target_sparsity(self) -> float:
        return 0.0

    def density(self) -> float:
        return 1.0

    def lr_scale(self) -> float:
        """How far this run's learning rate sits above the trainer's curve (``MSTConfig.lr_density_power``)."""
        return 1.0

    def lr_scales(self) -> dict[str, float]:
        """Per sparse weight, a factor on top of ``lr_scale`` (``MSTConfig.lr_density_scope="weight"``)."""
        return {}

    def densities(self) -> dict[str, float]:
        return {}

    def patterns(self) -> dict[str, str]:
        return {}

    def flops(self) -> dict[str, float]:
        """Cumulative training FLOPs of all processes."""
        raise NotImplementedError

    def reduction(self) -> float:
        f = self.flops()
        return f["dense_flops"] / f["mst_flops"] if f["mst_flops"] else 1.0

    def excluded(self) -> list:
        return []

    def new_updates(self) -> list[dict]:
        """Topology updates since the last call, as metrics records."""
        return []

    # -- checkpoints ------------------------------------------------------------------------
    def _dense_total(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"dense": self.dense, "tokens": self.tokens, "dense_total": self._dense_total(),
                "mst": self.mst.state_dict(whole=True) if self.mst is not None else None}  # whole masks, also under FSDP2

    def load_state_dict(self, sd: dict, where) -> None:
        if sd.get("dense") != self.dense:
            kind = "a dense baseline" if sd.get("dense") else "an MST run"
            raise CheckpointError(f"checkpoint {where} belongs to {kind}; this run is {'dense' if self.dense else 'MST'}")
        self.tokens = int(sd["tokens"])
        self._load(sd)

    def _load(self, sd: dict) -> None:
        pass


class DenseAccounting(Accounting):
    """The dense baseline: the ledger's formula at density 1, charged per token."""

    def __init__(self, module, world: int, per_token: float):
        super().__init__(module, world)
        self._per_token, self._total = per_token, 0.0

    def after_step(self, tokens: int) -> None:
        super().after_step(tokens)
        self._total += self._per_token * tokens

    def flops(self) -> dict[str, float]:
        return {"mst_flops": self._total, "dense_flops": self._total}

    def _dense_total(self) -> float:
        return self._total

    def _load(self, sd: dict) -> None:
        self._total = float(sd["dense_total"])


class MSTAccounting(Accounting):
    """An MST run: everything from the runtime handle ``sm.mst`` and its FLOP ledger."""

    dense = False

    def __init__(self, sm, world: int):
        super().__init__(sm, world)
        self.sm = sm
        self.mst = sm.mst
        self._seen_update = None

    def attach(self, optimizer) -> None:
        self.mst.attach(optimizer)

    @property
    def phase(self) -> str:
        return self.mst.phase

    @property
    def target_sparsity(self) -> float:
        return float(self.mst.target_sparsity)

    def density(self) -> float:
        return float(self.mst.density())

    def lr_scale(self) -> float:
        return self.mst.lr_scale()

    def lr_scales(self) -> dict[str, float]:
        return self.mst.lr_scales()

    def densities(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.mst.densities().items()}

    def patterns(self) -> dict[str, str]:
        return dict(self.mst.attention_patterns())

    def flops(self) -> dict[str, float]:
        """Each process's ledger counts its own tokens: scaled by the world size."""
        f = self.mst.flops
        return {"mst_flops": float(f.mst_total) * self.world, "dense_flops": float(f.dense_total) * self.world}

    def excluded(self) -> list:
        return list(getattr(self.mst.flops, "excluded", []) or [])

    def new_updates(self) -> list[dict]:
        u = self.mst.last_update
        if u is None or u is self._seen_update:
            return []
        self._seen_update = u
        rec = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v) for k, v in dict(u).items()}
        rec.setdefault("step", int(self.mst.step_count))
        return [rec]

    def _load(self, sd: dict) -> None:
        self.mst.load_state_dict(sd["mst"])
        self._seen_update = self.mst.last_update  # already logged before the interruption


def dense_flops_per_token(model, mst_config, example_inputs, batch) -> float:
    """Training FLOPs per token of the dense model, by the ledger's formula (docs/design.md §6).

    The sites are found by the same passes MST uses (on a throwaway capture sharing the model's
    parameters), and the ledger measures one forward on a real (B, T) batch: the dense side of what
    an MST step on that batch would be charged, so both runs count the same ops.
    """
    from ..api import sparsify
    from ..capture import split_inputs

    sm = sparsify(model, mst_config, example_inputs=example_inputs)
    args, kwargs = split_inputs(batch)  # a model with a batch() hook takes more than the token ids
    _, dense, tokens = sm.mst.measure_flops(*args, **kwargs)
    return dense / tokens


def ranks_identical(acct: Accounting, model, d) -> dict[str, bool]:
    """Compare masks and weights across processes by hash (DDP must keep both bit-identical)."""
    def digest(tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    masks = digest(acct.mst.masks().values()) if acct.mst is not None else ""
    weights = digest(p for _, p in sorted(model.state_dict().items()))
    got = d.gather((masks, weights))
    return {"masks": len({g[0] for g in got}) == 1, "weights": len({g[1] for g in got}) == 1}
