"""torch.compile(fullgraph=True) traces through the custom ops without a graph break."""

import pytest
import torch

import flashtile
from helpers import check_attention


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend):
    def block(q, k, v):
        # some ordinary ops around the attention, as in a transformer layer
        out = flashtile.flash_attn_func(q * 1.0, k, v, causal=True)
        return out.relu() + out

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    q, k, v = (torch.randn(2, 40, 2, 16, requires_grad=True) for _ in range(3))
    out = compiled(q, k, v)
    expected = block(q, k, v)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    grads_expected = torch.autograd.grad(expected.sum(), (q, k, v))
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b)


def test_compile_sdpa_gqa():
    fn = torch.compile(lambda q, k, v: flashtile.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                       fullgraph=True, backend="aot_eager")

    def flash_layout(q, k, v):
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    q, k, v = torch.randn(1, 33, 4, 24), torch.randn(1, 50, 2, 24), torch.randn(1, 50, 2, 24)
    check_attention(flash_layout, q, k, v)


def test_custom_ops_pass_opcheck():
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 30, 1, 16), torch.randn(1, 30, 1, 16)
    torch.library.opcheck(torch.ops.flashtile.attn_fwd.default, (q, k, v, 0.25, True, 10))
    out, lse = torch.ops.flashtile.attn_fwd(q, k, v, 0.25, True, 10)
    torch.library.opcheck(torch.ops.flashtile.attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, 0.25, True, 10))
