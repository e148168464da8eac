"""torch.compile(fullgraph=True) traces through the custom ops without a graph break."""

import pytest
import torch
from helpers import check_attention

import flashtile


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


@pytest.mark.parametrize("path", ["triton", "tiled"])
@pytest.mark.parametrize("features", ["plain", "bias_alibi_window", "varlen_dropout", "sdpa_layout"])
def test_custom_ops_pass_opcheck(features, path, monkeypatch):
    # the fake implementations promise the real outputs' shapes and strides, on either backend
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 30, 1, 16), torch.randn(1, 30, 1, 16)
    cu_q = cu_k = bias = alibi = seed = None
    max_q = max_k = 0
    window, dropout = (-1, 0), 0.0
    if features == "bias_alibi_window":
        bias, alibi, window = torch.randn(1, 2, 20, 30, requires_grad=True), torch.rand(2), (12, 3)
    elif features == "sdpa_layout":  # views of (batch, nheads, seqlen, headdim) tensors
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif features == "varlen_dropout":
        q, k, v = q[0], k[0], v[0]
        cu_q, cu_k = torch.tensor([0, 5, 20], dtype=torch.int32), torch.tensor([0, 18, 30], dtype=torch.int32)
        max_q, max_k, dropout, seed = 15, 18, 0.3, torch.tensor(42)
    args = (cu_q, cu_k, bias, alibi, seed, max_q, max_k, 0.25, 10, *window, 0.0, dropout)
    torch.library.opcheck(torch.ops.flashtile.attn_fwd.default, (q, k, v, *args))
    out, lse = torch.ops.flashtile.attn_fwd(q, k, v, *args)
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # no double backward
    torch.library.opcheck(torch.ops.flashtile.attn_bwd.default,
                          (torch.randn_like(out).detach(), q, k, v, out.detach(), lse, *bwd_args, bias is not None))


def test_compile_with_mask_and_dropout():
    # a float mask with its gradient, and dropout (seed drawn inside the graph)
    def block(q, k, v, mask):
        return flashtile.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(24, 24, requires_grad=True)
    torch.manual_seed(0)
    out = compiled(q, k, v, mask)
    torch.manual_seed(0)
    expected = block(q, k, v, mask)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all()


def test_compile_inductor_backward_on_the_cpu_path(monkeypatch):
    # CPU tensors outside the interpreter take the tiled path; Inductor checks the real
    # outputs' strides against the fake ones (SDPA-layout views, as a model passes them)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = torch.compile(lambda q, k, v: flashtile.scaled_dot_product_attention(q, k, v, is_causal=True),
                          fullgraph=True, backend="inductor")
    q, k, v = (torch.randn(2, 24, 3, 16).transpose(1, 2).requires_grad_() for _ in range(3))
    out = layer(q, k, v)
    out.sum().backward()
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
