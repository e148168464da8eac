"""Attention sinks (``sinks=``: one logit per head in every row's softmax
denominator) on every function that takes them, forward and every gradient
(the sinks' included) against attention_ref with the accuracy rule. Each test
runs on the Triton kernels (interpreter, also with the two-halves schedule)
and on the tiled PyTorch path."""

import pytest
import torch
from helpers import check_attention, max_err, rounding_floor

import flashtile
from flashtile import (
    KVCache,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from flashtile.testing import attention_ref


def qkv(b, sq, sk, h, hk, d, dtype):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


# sinks of every size: below, among and above the scores (|scores| ~ 3 here), and one head
# whose sink takes nearly all the weight
SINKS = torch.tensor([-20.0, -1.5, 0.3, 2.0, 6.0, 25.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sinks_dense(backend, dtype, causal):
    q, k, v = qkv(2, 77, 113, 6, 2, 40, dtype)
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, causal=causal, sinks=sinks),
                    q, k, v, sinks=SINKS, causal=causal)


@pytest.mark.parametrize("window", [(16, 0), (10, 24), (40, -1)], ids=str)
def test_sinks_window_softcap_alibi(backend, window):
    q, k, v = qkv(1, 100, 150, 6, 3, 32, torch.bfloat16)
    kw = dict(window_size=window, softcap=4.0, alibi_slopes=torch.rand(6) * 0.2)
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, sinks=sinks, **kw), q, k, v,
                    sinks=SINKS.to(torch.bfloat16), **kw)


def test_sinks_rows_that_see_no_key(backend):
    # causal, more queries than keys: the first 30 rows see no key; the sink is all they have
    q, k, v = qkv(1, 70, 40, 6, 6, 32, torch.float16)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, sinks=SINKS, return_attn_probs=True)
    assert torch.equal(out[:, :30], torch.zeros_like(out[:, :30]))
    assert torch.equal(lse[:, :, :30], SINKS[None, :, None].expand(1, 6, 30))
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, causal=True, sinks=sinks), q, k, v,
                    sinks=SINKS, causal=True)


def test_sinks_fp16_range(backend):
    # scores and sinks near the top of fp16's range of exponentials: nothing overflows
    q, k, v = qkv(1, 64, 96, 6, 6, 64, torch.float16)
    q = q * 6
    sinks = torch.tensor([60.0, 40.0, 0.0, -60.0, 80.0, 20.0])
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, sinks=sinks), q, k, v, sinks=sinks)


def test_sinks_lse(backend):
    q, k, v = qkv(2, 50, 70, 6, 2, 32, torch.float32)
    _, lse, _ = flash_attn_func(q, k, v, causal=True, sinks=SINKS, return_attn_probs=True)
    _, lse_ref = attention_ref(q, k, v, causal=True, sinks=SINKS, return_lse=True, compute_dtype=torch.float64)
    assert max_err(lse, lse_ref) <= 1e-5 * lse_ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sinks_dropout(backend, dtype):
    q, k, v = qkv(1, 60, 90, 6, 2, 32, dtype)
    p = 0.2
    torch.manual_seed(5)
    state = torch.get_rng_state()
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=True, sinks=SINKS, return_attn_probs=True)

    def fn(q, k, v, sinks):
        torch.set_rng_state(state)
        return flash_attn_func(q, k, v, dropout_p=p, causal=True, sinks=sinks)

    check_attention(fn, q, k, v, sinks=SINKS, causal=True, dropout_p=p, dropout_mask=s_dmask >= 0)


def test_sinks_varlen(backend):
    # ragged lengths with a sequence that has no keys (its rows: zeros, LSE = sink) and one with no queries
    lens_q, lens_k = [13, 0, 40, 7, 25], [30, 12, 40, 0, 18]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), 6, 48, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 2, 48, dtype=torch.bfloat16) for _ in range(2))
    sinks = SINKS.clone()

    def fn(q, k, v, sinks):
        return flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                      sinks=sinks)[None]

    def ref(q, k, v, sinks, **kw):
        outs = []
        for i in range(len(lens_q)):
            sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            outs.append(attention_ref(q[:, sq], k[:, sk], v[:, sk], sinks=sinks, **kw))
        return torch.cat(outs, 1)

    check_attention(fn, q[None], k[None], v[None], sinks=sinks, ref_fn=ref, causal=True)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, sinks=sinks,
                                         return_attn_probs=True)
    rows = slice(int(cu_q[3]), int(cu_q[4]))  # the sequence without keys
    assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    assert torch.equal(lse[:, rows], sinks[:, None].expand(6, 7))


def test_sinks_sdpa_layout(backend):
    q, k, v = qkv(2, 40, 64, 6, 3, 32, torch.float16)
    def fn(q, k, v, sinks):
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                            enable_gqa=True, sinks=sinks).transpose(1, 2)
    check_attention(fn, q, k, v, sinks=SINKS, causal=True, causal_align="top_left")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sinks_kvcache(backend, paged, num_splits):
    # a sequence with no keys yet gives zeros and LSE = sink; the sink is counted once over the splits
    batch, nheads, nheads_k, d, page = 3, 6, 2, 32, 16
    lengths = torch.tensor([50, 0, 97], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(batch, 128, nheads_k, d, dtype=torch.float16) for _ in range(2))
    q = torch.randn(batch, 2, nheads, d, dtype=torch.float16)
    kw = dict(cache_seqlens=lengths, causal=True, num_splits=num_splits, sinks=SINKS, return_softmax_lse=True)
    if paged:
        pages = torch.randperm(batch * 8).reshape(batch, 8).to(torch.int32)
        k_paged, v_paged = (torch.empty(batch * 8, page, nheads_k, d, dtype=torch.float16) for _ in range(2))
        k_paged[pages.flatten().long()] = k_cache.reshape(batch * 8, page, nheads_k, d)
        v_paged[pages.flatten().long()] = v_cache.reshape(batch * 8, page, nheads_k, d)
        out, lse = flash_attn_with_kvcache(q, k_paged, v_paged, block_table=pages, **kw)
    else:
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    for b in range(batch):
        n = int(lengths[b])
        args = (q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
        ref, ref_lse = attention_ref(*args, causal=True, sinks=SINKS, return_lse=True, compute_dtype=torch.float64)
        low = attention_ref(*args, causal=True, sinks=SINKS, upcast=False)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, torch.float16)
        assert max_err(lse[b:b + 1], ref_lse) <= 1e-5 * max(1.0, ref_lse.abs().max().item())
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_sinks_kvcache_object(backend):
    cache = KVCache(2, 64, 2, 16, dtype=torch.float32)
    k, v = (torch.randn(2, 20, 2, 16) for _ in range(2))
    q = torch.randn(2, 20, 6, 16)
    out = cache.attend(q, k, v, causal=True, sinks=SINKS)
    ref = attention_ref(q, k, v, causal=True, sinks=SINKS, compute_dtype=torch.float64)
    assert max_err(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())


def test_sinks_grad_dtype_follows_sinks(backend):
    q, k, v = qkv(1, 20, 30, 6, 6, 16, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        sinks = SINKS.to(dtype).clone().requires_grad_()
        flash_attn_func(q, k, v, sinks=sinks).float().sum().backward()
        assert sinks.grad.dtype == dtype and sinks.grad.shape == (6,)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5), r"sinks must have shape \(6,\)"),
    (torch.zeros(1, 6), r"sinks must have shape \(6,\)"),
    (torch.zeros(6, dtype=torch.float64), "sinks must be float32"),
    (torch.zeros(6, dtype=torch.int32), "sinks must be float32"),
    ([0.0] * 6, "sinks must be a torch.Tensor"),
])
def test_sinks_errors(bad, match):
    q, k, v = qkv(1, 8, 8, 6, 6, 16, torch.float16)
    with pytest.raises((TypeError, ValueError), match=match):
        flash_attn_func(q, k, v, sinks=bad)


def test_sinks_compile_fullgraph():
    q, k, v = qkv(1, 24, 40, 6, 2, 16, torch.float32)
    sinks = SINKS.clone().requires_grad_()
    compiled = torch.compile(lambda q, k, v, s: flashtile.flash_attn_func(q, k, v, causal=True, sinks=s),
                             fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, sinks)
    out.sum().backward()
    ref = attention_ref(q, k, v, causal=True, sinks=sinks.detach(), compute_dtype=torch.float64)
    assert max_err(out, ref) <= 1e-5
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all()


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kind", ["causal", "full", "window", "varlen"])
def test_sinks_gpu(dtype, head_dim, kind):
    sinks = SINKS.repeat(2)[:8].cuda()
    if kind == "varlen":
        lens_q, lens_k = [700, 0, 1500, 33], [900, 50, 1500, 0]
        cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32).cuda()
        cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32).cuda()
        q = torch.randn(1, sum(lens_q), 8, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, sum(lens_k), 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))

        def fn(q, k, v, sinks):
            return flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                          sinks=sinks)[None]

        def ref(q, k, v, sinks, **kw):
            return torch.cat([attention_ref(q[:, int(cu_q[i]):int(cu_q[i + 1])], k[:, int(cu_k[i]):int(cu_k[i + 1])],
                                            v[:, int(cu_k[i]):int(cu_k[i + 1])], sinks=sinks, **kw)
                              for i in range(len(lens_q))], 1)

        check_attention(fn, q, k, v, sinks=sinks, ref_fn=ref, causal=True)
        return
    kw = dict(causal=kind == "causal", window_size=(300, 20) if kind == "window" else (-1, -1))
    q = torch.randn(2, 1500, 8, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 2100, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, sinks=sinks, **kw), q, k, v, sinks=sinks, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_sinks_kvcache_gpu(paged):
    batch, nheads, nheads_k, d = 4, 16, 2, 128
    lengths = torch.tensor([3000, 1, 0, 4095], dtype=torch.int32, device="cuda")
    k_cache, v_cache = (torch.randn(batch, 4096, nheads_k, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    q = torch.randn(batch, 1, nheads, d, dtype=torch.bfloat16, device="cuda")
    sinks = torch.randn(nheads, device="cuda") * 3
    if paged:
        pages = torch.randperm(batch * 64, device="cuda").reshape(batch, 64).to(torch.int32)
        k_paged, v_paged = (torch.empty(batch * 64, 64, nheads_k, d, dtype=torch.bfloat16, device="cuda")
                            for _ in range(2))
        k_paged[pages.flatten().long()] = k_cache.reshape(batch * 64, 64, nheads_k, d)
        v_paged[pages.flatten().long()] = v_cache.reshape(batch * 64, 64, nheads_k, d)
        out = flash_attn_with_kvcache(q, k_paged, v_paged, cache_seqlens=lengths, block_table=pages, sinks=sinks)
    else:
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, sinks=sinks)
    for b in range(batch):
        n = int(lengths[b])
        args = (q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
        ref = attention_ref(*args, sinks=sinks, compute_dtype=torch.float64)
        low = attention_ref(*args, sinks=sinks, upcast=False)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, torch.bfloat16)
