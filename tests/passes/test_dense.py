"""passes/dense.py: every matmul and attention op left after the other passes becomes a DenseOp of the
right kind that computes what the op computed; a one-operand einsum (a permutation) is left alone."""
import torch
import torch.nn.functional as F
from torch import fx, nn

from mst_compile.constants import DENSE_CONTAINER
from mst_compile.ops.dense_op import DenseOp
from mst_compile.passes.dense import wrap_dense


class Leftovers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x):  # x (B, T, 8)
        h = self.lin(x)  # an nn.Linear left dense
        h = F.linear(h, self.w)  # linear
        s = h @ h.transpose(-1, -2)  # matmul (activation x activation)
        h = torch.bmm(s.softmax(-1), h)  # matmul
        h = torch.einsum("btc,cd->btd", h, self.w)  # einsum
        h = torch.einsum("btc->tbc", h).transpose(0, 1)  # a permutation: not a matmul
        h = torch.addmm(self.b, h.reshape(-1, 8), self.w).reshape(x.shape)  # addmm
        q = h.unsqueeze(1)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).squeeze(1)  # sdpa


def test_every_leftover_op_is_wrapped_and_computes_the_same():
    torch.manual_seed(0)
    model = Leftovers()
    x = torch.randn(2, 5, 8)
    expected = model(x)
    gm = fx.symbolic_trace(model)
    result = wrap_dense(gm)
    kinds = [m.kind for m in result.sites]
    assert kinds == ["linear", "linear", "matmul", "matmul", "einsum", "addmm", "sdpa"]
    container = gm.get_submodule(DENSE_CONTAINER)
    assert [type(m) for m in container.children()] == [DenseOp] * 7
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == [f"{DENSE_CONTAINER}.op_{i}" for i in range(7)]  # nothing else is called, lin included
    einsums = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.einsum]
    assert len(einsums) == 1  # the permutation stays
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    out = gm(x)
    out.sum().backward()
    assert model.lin.weight.grad is not None and model.w.grad is not None  # parameters still train


def test_a_second_run_adds_no_sites():
    gm = fx.symbolic_trace(Leftovers())
    wrap_dense(gm)
    assert wrap_dense(gm).sites == []
