"""Sliding window, softcap, ALiBi, SDPA attn_mask (bool / additive with gradient),
dropout, and their combinations, forward and every gradient, against
attention_ref. Each test runs on the Triton kernels (interpreter) and on the
tiled PyTorch path."""

import pytest
import torch
from helpers import check_attention, max_err, rounding_floor

from flashtile import flash_attn_func, scaled_dot_product_attention
from flashtile.testing import attention_ref


def qkv(b, sq, sk, h, hk, d, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


def sdpa_in_flash_layout(**kwargs):
    def fn(q, k, v, bias=None):
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_mask=bias, **kwargs).transpose(1, 2)
    return fn


@pytest.mark.parametrize("window, causal, lengths", [
    ((16, 0), False, (113, 203)), ((10, 24), False, (113, 203)), ((-1, 5), False, (150, 70)),
    ((40, -1), False, (113, 203)), ((0, 0), False, (150, 70)), ((10, 24), True, (150, 70)),
    ((40, -1), True, (113, 203)), ((70, 3), True, (70, 150)),
], ids=str)
def test_sliding_window(backend, window, causal, lengths):
    q, k, v = qkv(1, *lengths, 4, 2, 40, torch.float16)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=window),
                    q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(backend, dtype, causal):
    q, k, v = qkv(1, 77, 113, 4, 4, 59, dtype)
    q = q * 3  # large scores, so the cap bites
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, softcap=2.5),
                    q, k, v, causal=causal, softcap=2.5)


@pytest.mark.parametrize("per_batch", [False, True], ids=["per_head", "per_batch"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(backend, per_batch, causal):
    q, k, v = qkv(2, 90, 130, 2, 1, 32, torch.bfloat16)
    slopes = torch.rand(2, 2) if per_batch else torch.rand(2)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes),
                    q, k, v, causal=causal, alibi_slopes=slopes)


def test_window_softcap_alibi_gqa_together(backend):
    q, k, v = qkv(1, 100, 180, 6, 2, 48, torch.float16)
    slopes = torch.rand(6) * 0.3
    kw = dict(causal=True, window_size=(33, 7), softcap=4.0, alibi_slopes=slopes, softmax_scale=0.2)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("shape", [(2, 4, 60, 90), (1, 4, 60, 90), (2, 1, 60, 90), (60, 90), (2, 1, 1, 90)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_additive_mask_with_gradient(backend, shape, dtype):
    q, k, v = qkv(2, 60, 90, 4, 2, 32, dtype)
    bias = torch.randn(shape, dtype=dtype).requires_grad_()
    check_attention(sdpa_in_flash_layout(enable_gqa=True), q, k, v, bias=bias, causal_align="top_left")


@pytest.mark.parametrize("shape", [(2, 4, 70, 100), (2, 1, 1, 100), (70, 100)], ids=str)
def test_boolean_mask(backend, shape):
    q, k, v = qkv(2, 70, 100, 4, 4, 24, torch.float16)
    mask = torch.rand(shape) > 0.3
    if len(shape) == 4 and shape[2] > 1:
        mask[0, :, 5] = False  # rows that see no key: zeros, finite gradients
    check_attention(sdpa_in_flash_layout(), q, k, v, bias=mask)


def test_fully_masked_rows_give_zeros(backend):
    q, k, v = qkv(1, 40, 50, 2, 2, 16)
    mask = torch.ones(1, 2, 40, 50, dtype=torch.bool)
    mask[..., 10:20, :] = False
    bias = torch.zeros(1, 2, 40, 50)
    bias[..., 30, :] = float("-inf")
    for m in (mask, bias):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out = sdpa_in_flash_layout()(q_, k_, v_, m)
        out.sum().backward()
        rows = slice(10, 20) if m.dtype == torch.bool else slice(30, 31)
        assert torch.equal(out[:, rows], torch.zeros_like(out[:, rows]))
        assert all(torch.isfinite(t.grad).all() for t in (q_, k_, v_))
    # a window that leaves the first rows without keys (bottom-right alignment, seqlen_q > seqlen_k)
    q, k, v = qkv(1, 60, 20, 2, 2, 16)
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out[:, :40], torch.zeros_like(out[:, :40]))


def test_key_padding_mask_matches_torch(backend):
    q, k, v = (torch.randn(3, 4, 50, 32) for _ in range(3))
    keep = torch.arange(50)[None, :] < torch.tensor([50, 31, 7])[:, None]
    mask = keep[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               atol=2e-5, rtol=1e-4)


# --- dropout ----------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dropout_matches_reference_with_recovered_mask(backend, causal, dtype):
    q, k, v = qkv(1, 77, 96, 4, 2, 32, dtype)
    p = 0.17
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    out_a = flash_attn_func(q, k, v, dropout_p=p, causal=causal)
    torch.set_rng_state(state)
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_attn_probs=True)
    assert s_dmask.shape == (1, 4, 77, 96)
    keep = s_dmask >= 0

    def fn(q, k, v):
        torch.set_rng_state(state)
        return flash_attn_func(q, k, v, dropout_p=p, causal=causal)

    assert torch.equal(fn(q, k, v), out_a)  # reproducible for a given torch seed
    check_attention(fn, q, k, v, causal=causal, dropout_p=p, dropout_mask=keep)


def test_dropout_sdpa_and_gqa(backend):
    q, k, v = qkv(1, 64, 80, 4, 1, 16)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)

    def fn(q, k, v):
        torch.set_rng_state(state)
        return sdpa_in_flash_layout(dropout_p=0.3, enable_gqa=True)(q, k, v)

    # the SDPA API draws the seed the same way, so the same pattern applies
    check_attention(fn, q, k, v, dropout_p=0.3, dropout_mask=s_dmask >= 0, causal_align="top_left")


def test_dropout_kept_fraction(monkeypatch):
    # S_dmask comes from the PyTorch twin of the kernels' generator (checked against
    # tl.rand below), so the fast tiled path serves for a large tensor
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 512, 512, 4, 4, 8)
    for p in (0.1, 0.5):
        _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
        kept = (s_dmask >= 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.01, kept
    first = flash_attn_func(q[:, :64], k[:, :64], v[:, :64], dropout_p=0.5, return_attn_probs=True)[2]
    second = flash_attn_func(q[:, :64], k[:, :64], v[:, :64], dropout_p=0.5, return_attn_probs=True)[2]
    assert not torch.equal(first >= 0, second >= 0)  # a fresh seed per call


def test_dropout_generator_matches_triton():
    # the PyTorch Philox used by the tiled path and S_dmask against Triton's tl.rand, bit for bit
    import triton
    import triton.language as tl

    from flashtile.backends.dropout import _philox_uniform

    @triton.jit
    def rand_kernel(Out, Offsets, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Out + i, tl.rand(seed, tl.load(Offsets + i)))

    offsets = torch.cat([torch.arange(64), torch.randint(0, 2**40, (64,))]).to(torch.int64)
    for seed in (0, 12345, 2**31 - 2):
        out = torch.empty(128)
        rand_kernel[(1,)](out, offsets, seed, N=128)
        assert torch.equal(out, _philox_uniform(seed, offsets))


def test_dropout_zero_is_exact():
    q, k, v = qkv(1, 30, 30, 2, 2, 16)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=0.0, return_attn_probs=True)
    assert s_dmask is None
    ref = attention_ref(q, k, v)
    assert max_err(out, ref) <= rounding_floor(ref, torch.float32) + 1e-6


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gpu_matches_torch(causal):
    q = torch.randn(4, 8, 1500, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           enable_gqa=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-2


GPU_FEATURES = {
    "window": dict(window_size=(300, 40)),
    "causal_window": dict(causal=True, window_size=(513, 0)),
    "softcap": dict(softcap=5.0),
    "alibi": dict(alibi_slopes="per_head"),
    "everything": dict(causal=True, window_size=(700, 0), softcap=8.0, alibi_slopes="per_batch"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", list(GPU_FEATURES))
def test_flash_attn_options_gpu(dtype, head_dim, feature):
    kw = dict(GPU_FEATURES[feature])
    if kw.get("alibi_slopes") == "per_head":
        kw["alibi_slopes"] = torch.rand(8, device="cuda") * 0.1
    elif kw.get("alibi_slopes") == "per_batch":
        kw["alibi_slopes"] = torch.rand(2, 8, device="cuda") * 0.1
    q = torch.randn(2, 1500, 8, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 2100, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 8, 1000, 1200), (1, 8, 1000, 1200), (2, 1, 1, 1200)], ids=str)
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_sdpa_mask_gpu(shape, kind):
    dtype = torch.bfloat16
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 1200, 4, 128, device="cuda", dtype=dtype) for _ in range(2))
    if kind == "float":
        bias = torch.randn(shape, device="cuda", dtype=dtype).requires_grad_()
    else:
        bias = torch.rand(shape, device="cuda") > 0.2

    def fn(q, k, v, bias):
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            attn_mask=bias, enable_gqa=True).transpose(1, 2)

    check_attention(fn, q, k, v, bias=bias, causal_align="top_left")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_gpu(causal):
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1300, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.1, causal=causal, return_attn_probs=True)
    attended = s_dmask != 0  # causal leaves zeros (probability 0) that dropout does not see
    assert abs((s_dmask > 0).sum().item() / attended.sum().item() - 0.9) < 0.01

    def fn(q, k, v):
        torch.set_rng_state(state)
        return flash_attn_func(q, k, v, dropout_p=0.1, causal=causal)

    check_attention(fn, q, k, v, causal=causal, dropout_p=0.1, dropout_mask=s_dmask >= 0)

