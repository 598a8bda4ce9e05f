"""torch.compile of an MST training step: new masks at every topology update cost no recompilation."""
import pytest
import torch
import torch.nn.functional as F
from _models import tiny_gpt
from torch._dynamo.utils import counters

import mst_compile


@pytest.mark.slow
def test_topology_updates_do_not_recompile():
    """24 steps, an update every 2 (11 updates), three phases: the graphs compiled stop growing once
    each (phase, probe step) variant has been seen, however many updates follow."""
    torch.manual_seed(0)
    cfg = mst_compile.MSTConfig(update_interval=2, warmup_end=0.25, ultra_end=0.75, stride=4)
    sm = mst_compile.sparsify(tiny_gpt(), cfg, total_steps=24)
    opt = torch.optim.AdamW(sm.parameters(), lr=1e-2)
    sm.mst.attach(opt)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sm, backend="aot_eager")  # dynamo + AOT autograd; guards as with inductor
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    graphs, masks = {}, {}
    for _ in range(24):
        loss = F.cross_entropy(compiled(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        graphs[sm.mst.step_count] = counters["stats"]["unique_graphs"]
        masks[sm.mst.step_count] = torch.cat([m.flatten() for m in sm.mst.masks().values()])
    assert sm.mst.last_update["step"] == 22  # no update at the last step (docs/design.md §6)
    for a, b in [(10, 16), (20, 24)]:  # several updates inside the ultra and restoration phases
        assert not torch.equal(masks[a], masks[b]), f"the masks should change between steps {a} and {b}"
        assert graphs[b] == graphs[a], f"recompiled between steps {a} and {b}: {graphs}"
    assert graphs[24] <= 8, f"more graphs than the (phase, probe) variants explain: {graphs}"
    torch.testing.assert_close(compiled(x[:, :-1]), sm(x[:, :-1]))
