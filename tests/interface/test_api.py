"""Public API behaviour: layouts, packing, strides, SDPA semantics, edge cases."""

import pytest
import torch
from helpers import check_attention

import flashtile
import flashtile.testing
from flashtile import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    scaled_dot_product_attention,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_qkvpacked_reads_strided_views(dtype):
    qkv = torch.randn(2, 77, 3, 4, 40, dtype=dtype)

    def fn(q, k, v):  # the kernel reads q, k, v as strided slices of one packed tensor
        return flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), causal=True)

    check_attention(fn, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)


def test_kvpacked_gqa():
    q = torch.randn(2, 50, 6, 32)
    kv = torch.randn(2, 90, 2, 2, 32)
    check_attention(lambda q, k, v: flash_attn_kvpacked_func(q, torch.stack([k, v], 2)), q, kv[:, :, 0], kv[:, :, 1])


def test_non_contiguous_inputs():
    # every tensor a different strided view: transposed, sliced, last dim not contiguous
    base = torch.randn(2, 8, 96, 48)
    q = base[:, :4].transpose(1, 2)               # (2, 96, 4, 48), head stride != dim
    k = torch.randn(2, 4, 70, 48).transpose(1, 2)[:, ::2]  # sliced sequence
    v = torch.randn(2, 48, 35, 4).permute(0, 2, 3, 1)      # last dim not contiguous
    check_attention(lambda q, k, v: flash_attn_func(q, k, v), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(64, 100), (100, 64), (1, 33)], ids=str)
def test_sdpa_matches_torch(causal, lengths):
    seqlen_q, seqlen_k = lengths
    q = torch.randn(2, 4, seqlen_q, 40)
    k = torch.randn(2, 2, seqlen_k, 40)
    v = torch.randn(2, 2, seqlen_k, 40)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_cpu_strides_as_pytorch_gives_them(causal):
    # dense CPU calls run PyTorch's fused kernel: its output and gradients come back in the strides
    # PyTorch's own SDPA gives them
    q, k, v = (torch.randn(2, 4, 70, 32, requires_grad=True) for _ in range(3))
    out = scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_sdpa_gradients_top_left_causal():
    def fn(q, k, v):  # flash_attn layout in and out, SDPA layout inside
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True).transpose(1, 2)

    q, k, v = torch.randn(1, 90, 2, 24), torch.randn(1, 50, 2, 24), torch.randn(1, 50, 2, 24)
    check_attention(fn, q, k, v, causal=True, causal_align="top_left")


def test_sdpa_3d_inputs():
    q, k, v = torch.randn(3, 20, 16), torch.randn(3, 30, 16), torch.randn(3, 30, 16)
    out = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


def test_bottom_right_rows_without_keys_are_zero():
    # seqlen_q > seqlen_k with bottom-right causal: the first rows see no key
    q, k, v = torch.randn(1, 50, 2, 32), torch.randn(1, 20, 2, 32), torch.randn(1, 20, 2, 32)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :30] == 0)
    assert torch.all(lse[:, :, :30] == float("-inf"))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :30] == 0)


def test_lse_matches_reference():
    q, k, v = torch.randn(2, 70, 4, 64), torch.randn(2, 90, 2, 64), torch.randn(2, 90, 2, 64)
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    _, lse_ref = flashtile.testing.attention_ref(q, k, v, causal=True, return_lse=True, compute_dtype=torch.float64)
    assert s_dmask is None and lse.dtype == torch.float32 and lse.shape == (2, 4, 70)
    torch.testing.assert_close(lse, lse_ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape_q, shape_k", [((0, 5, 2, 16), (0, 7, 2, 16)), ((2, 0, 2, 16), (2, 7, 2, 16)),
                                              ((2, 5, 2, 16), (2, 0, 2, 16))], ids=["batch0", "seqq0", "seqk0"])
def test_empty_inputs(shape_q, shape_k):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_k, requires_grad=True)
    v = torch.randn(shape_k, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and torch.all(q.grad == 0)


def test_single_token():
    q, k, v = torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)


def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 100, 4, 32, requires_grad=True) for _ in range(3))
    k2 = k.detach()[:, :, :2].clone().requires_grad_()
    v2 = v.detach()[:, :, :2].clone().requires_grad_()
    out = flash_attn_func(q, k2, v2, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k2, v2), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k2, v2), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
