"""flashtile behind PyTorch SDPA's flash operators (flashtile/integrations/sdpa_flash.py).

On a CPU the kernels are installed for the CPU dispatch key (PyTorch has no CPU
kernel of these operators) and the aten operators are called directly, with
PyTorch's own derivative formulas calling the backward operators; on a GPU the
activated implementation serves ``F.scaled_dot_product_attention`` itself."""

import pytest
import torch
from helpers import check_attention

import flashtile
from flashtile.integrations import sdpa_flash
from flashtile.testing import attention_ref


@pytest.fixture
def on_cpu():
    handle = sdpa_flash.install("CPU")
    yield handle
    handle.remove()


def test_registered_on_import_never_activated():
    from torch.nn import attention

    if not hasattr(attention, "list_flash_attention_impls"):
        pytest.skip("this PyTorch has no flash attention registry")
    assert "flashtile" in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() is None
    attention.activate_flash_attention_impl("flashtile")
    try:
        assert attention.current_flash_attention_impl() == "flashtile"
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None


def _sdpa_op(q, k, v, dropout_p=0.0, is_causal=False, scale=None):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]


@pytest.mark.parametrize("case", ["plain", "causal", "gqa_cross", "scale"])
def test_sdpa_operator_forward_backward(on_cpu, case):
    # flash_attn layout in and out of check_attention; the operator takes (B, H, S, D)
    sq, sk, hk = {"gqa_cross": (40, 70, 1)}.get(case, (53, 53, 2))
    q, k, v = torch.randn(2, sq, 4, 32), torch.randn(2, sk, hk, 32), torch.randn(2, sk, hk, 32)
    causal, scale = case == "causal", 0.3 if case == "scale" else None

    def fn(q, k, v):
        return _sdpa_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                        scale=scale).transpose(1, 2)

    check_attention(fn, q, k, v, causal=causal, softmax_scale=scale)


def test_sdpa_operator_outputs_match_the_operator_schema(on_cpu):
    q, k = torch.randn(2, 4, 30, 16), torch.randn(2, 2, 50, 16)
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, debug = \
        torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, False, False)
    meta = torch.ops.aten._scaled_dot_product_flash_attention(q.to("meta"), k.to("meta"), k.to("meta"), 0.0, False,
                                                              False)
    assert out.shape == meta[0].shape and out.stride() == meta[0].stride()
    assert lse.shape == meta[1].shape and lse.dtype == meta[1].dtype == torch.float32
    assert (max_q, max_k) == (30, 50) and rng_state.shape == (2,) and rng_state.dtype == torch.uint64
    _, lse_ref = attention_ref(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), return_lse=True)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-4)


def test_sdpa_operator_dropout_matches_flashtile(on_cpu):
    # the forward seeds flashtile's generator from PyTorch's, as flashtile's SDPA does: same
    # seed, same pattern, and the backward finds the seed in rng_state
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    torch.manual_seed(7)
    out = _sdpa_op(q, k, v, dropout_p=0.3)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(7)
    expected = flashtile.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    grads_expected = torch.autograd.grad(expected.sum(), (q, k, v))
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("window", [None, (20, 5)])
def test_flash_attention_operator(on_cpu, varlen, window):
    # the operator behind torch.nn.attention.varlen: flash_attn layout, causal bottom-right
    left, right = window or (None, None)
    if not varlen:
        q, k, v = torch.randn(2, 37, 4, 32), torch.randn(2, 61, 2, 32), torch.randn(2, 61, 2, 32)

        def fn(q, k, v):
            return torch.ops.aten._flash_attention_forward(q, k, v, None, None, 37, 61, 0.0, True, False,
                                                           window_size_left=left, window_size_right=right)[0]

        check_attention(fn, q, k, v, causal=True, window_size=(-1, -1) if window is None else window)
        return
    cu_q = torch.tensor([0, 13, 13, 43], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 25, 55], dtype=torch.int32)
    q, k, v = torch.randn(1, 43, 4, 32), torch.randn(1, 55, 2, 32), torch.randn(1, 55, 2, 32)

    def fn(q, k, v):
        return torch.ops.aten._flash_attention_forward(q[0], k[0], v[0], cu_q, cu_k, 30, 30, 0.0, True, False,
                                                       window_size_left=left, window_size_right=right)[0][None]

    def ref(q, k, v, **kw):
        parts = []
        for i in range(3):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            parts.append(attention_ref(q[:, qs], k[:, ks], v[:, ks], causal=True,
                                       window_size=(-1, -1) if window is None else window, **kw))
        return torch.cat(parts, dim=1)

    check_attention(fn, q, k, v, ref_fn=ref)


def test_calls_flashtile_does_not_serve_go_to_pytorch(on_cpu):
    # PyTorch has no CPU kernel of these operators: a call handed to it says so, rather than
    # flashtile answering with other semantics (here: the debug mask)
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(RuntimeError, match="flashtile does not serve"):
        torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["full", "causal", "gqa", "dropout"])
def test_activated_sdpa_matches_pytorch_gpu(dtype, case):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal, gqa = case == "causal", case == "gqa"
    q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2 if gqa else 8, 1000, 128, device="cuda", dtype=dtype, requires_grad=True)
            for _ in range(2))
    dout = torch.randn_like(q)
    calls = []

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa,
                                                                   dropout_p=0.2 if case == "dropout" else 0.0)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    pytorch = run()
    real = sdpa_flash._flash_forward
    sdpa_flash._flash_forward = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with sdpa_flash.enabled():
            torch.manual_seed(3)
            ours = run()
    finally:
        sdpa_flash._flash_forward = real
    if case == "dropout":  # flashtile's own pattern: the same as its SDPA function's under the seed
        torch.manual_seed(3)
        expected = flashtile.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        grads = torch.autograd.grad(expected, (q, k, v), dout)
        for a, b in zip(ours, (expected, *grads)):
            torch.testing.assert_close(a, b)
    assert calls, "SDPA's flash backend did not run flashtile's kernels"
    if case == "dropout":
        return
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           enable_gqa=gqa)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, a, b, r in zip(["out", "dq", "dk", "dv"], ours, pytorch, (ref, *ref_grads)):
        err, base = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert err <= 3 * base + 1e-2, (name, err, base)

