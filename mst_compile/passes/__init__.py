"""Graph rewrites, one per file (``pipeline.py`` runs them in order). Each pass is ``GraphModule -> PassResult``
and reports its matches."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.fx


@dataclass
class PassResult:
    """What a pass did: the rewritten module, the sites it rewrote, and the ones it skipped (with why)."""

    gm: torch.fx.GraphModule
    name: str
    sites: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (site, reason)
    # the linear pass: sparse parameters that something other than their sparse op also reads (a tied
    # embedding's lookup), so the runtime masks their gradient there too
    other_uses: list[str] = field(default_factory=list)

    def warn_if_empty(self) -> None:
        if not self.sites:
            why = "; ".join(f"{s}: {r}" for s, r in self.skipped) or "no matching op in the graph"
            warnings.warn(f"mst_compile pass '{self.name}' matched nothing ({why})", stacklevel=3)
