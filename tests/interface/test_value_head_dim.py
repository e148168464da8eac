"""A value head dim unlike the query/key head dim (DeepSeek's MLA: 192 for q/k,
128 for v), on every function that takes one, forward and every gradient
against attention_ref with the accuracy rule. Each test runs on the Triton
kernels (interpreter, also with the two-halves schedule) and on the tiled
PyTorch path."""

import pytest
import torch
from helpers import check_attention, cu, max_err, packed_ref, rounding_floor

from flashtile import (
    BlockMask,
    block_sparse_attn_func,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from flashtile.testing import attention_ref

# (q/k head dim, v head dim): MLA's, smaller and larger values, and pairs not powers of two
PAIRS = [(192, 128), (128, 64), (64, 128), (96, 256), (40, 24), (24, 12)]


def qkv(b, sq, sk, h, hk, d, dv, dtype):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, dv, dtype=dtype))


@pytest.mark.parametrize("dims", PAIRS, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense(backend, dims, causal):
    q, k, v = qkv(1, 45, 70, 4, 2, *dims, torch.bfloat16)
    out = flash_attn_func(q, k, v, causal=causal)
    assert out.shape == (1, 45, 4, dims[1])
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


def test_options_together(backend):
    q, k, v = qkv(2, 60, 90, 6, 3, 48, 80, torch.float16)
    kw = dict(window_size=(20, 5), softcap=3.0, alibi_slopes=torch.rand(6) * 0.2, softmax_scale=0.3)
    sinks = torch.randn(6) * 2
    check_attention(lambda q, k, v, sinks: flash_attn_func(q, k, v, sinks=sinks, **kw), q, k, v, sinks=sinks, **kw)


def test_dropout(backend):
    q, k, v = qkv(1, 50, 64, 4, 2, 32, 48, torch.float32)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)

    def fn(q, k, v):
        torch.set_rng_state(state)
        return flash_attn_func(q, k, v, dropout_p=0.25)

    check_attention(fn, q, k, v, dropout_p=0.25, dropout_mask=s_dmask >= 0)


def test_varlen(backend):
    lens_q, lens_k = [30, 0, 61, 9], [45, 12, 61, 0]
    q = torch.randn(sum(lens_q), 4, 192, dtype=torch.float16)
    k = torch.randn(sum(lens_k), 2, 192, dtype=torch.float16)
    v = torch.randn(sum(lens_k), 2, 128, dtype=torch.float16)

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=True)

    out = fn(q, k, v)
    assert out.shape == (sum(lens_q), 4, 128)
    check_attention(fn, q, k, v, ref_fn=packed_ref(lens_q, lens_k), causal=True)


def test_sdpa_layout(backend):
    # SDPA's layout: the output (batch, nheads, seqlen, dv) comes back in its own transposed layout
    q, k, v = qkv(2, 33, 47, 4, 4, 64, 32, torch.float32)
    def fn(q, k, v):
        return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True).transpose(1, 2)
    check_attention(fn, q, k, v, causal=True, causal_align="top_left")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache(backend, paged, num_splits):
    batch, nheads, nheads_k, d, dv, page = 2, 4, 2, 96, 64, 16
    lengths = torch.tensor([70, 113], dtype=torch.int32)
    k_cache = torch.randn(batch, 128, nheads_k, d, dtype=torch.float16)
    v_cache = torch.randn(batch, 128, nheads_k, dv, dtype=torch.float16)
    q = torch.randn(batch, 3, nheads, d, dtype=torch.float16)
    k_new, v_new = torch.randn(batch, 2, nheads_k, d, dtype=torch.float16), torch.randn(batch, 2, nheads_k, dv,
                                                                                       dtype=torch.float16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        n = int(lengths[b])
        ref_k[b, n:n + 2], ref_v[b, n:n + 2] = k_new[b], v_new[b]
    kw = dict(k=k_new, v=v_new, cache_seqlens=lengths, causal=True, num_splits=num_splits)
    if paged:
        pages = torch.randperm(batch * 8).reshape(batch, 8).to(torch.int32)
        k_paged = torch.empty(batch * 8, page, nheads_k, d, dtype=torch.float16)
        v_paged = torch.empty(batch * 8, page, nheads_k, dv, dtype=torch.float16)
        k_paged[pages.flatten().long()] = k_cache.reshape(batch * 8, page, nheads_k, d)
        v_paged[pages.flatten().long()] = v_cache.reshape(batch * 8, page, nheads_k, dv)
        out = flash_attn_with_kvcache(q, k_paged, v_paged, block_table=pages, **kw)
    else:
        out = flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert out.shape == (batch, 3, nheads, dv)
    for b in range(batch):
        n = int(lengths[b]) + 2
        args = (q[b:b + 1], ref_k[b:b + 1, :n], ref_v[b:b + 1, :n])
        ref = attention_ref(*args, causal=True, compute_dtype=torch.float64)
        low = attention_ref(*args, causal=True, upcast=False)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, torch.float16)


def test_block_sparse(backend):
    if backend == "triton_halves":
        pytest.skip("the block-sparse kernels take their own tiles")
    q, k, v = qkv(1, 128, 128, 4, 4, 64, 32, torch.bfloat16)
    mask = BlockMask.from_layout(torch.rand(1, 4, 4, 4) < 0.6, 32, 128, 128)
    check_attention(lambda q, k, v: block_sparse_attn_func(q, k, v, mask), q, k, v, attn_bias=mask.to_dense())


@pytest.mark.parametrize("bad_dv", [0, 257])
def test_bad_value_head_dim(bad_dv):
    q, k = torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match="v's head dim must be between 1 and 256"):
        flash_attn_func(q, k, torch.randn(1, 8, 2, bad_dv))


@pytest.mark.parametrize("dims, block_dv", [((24, 12), 32), ((64, 8), 64), ((16, 12), 16), ((24, 24), 32),
                                             ((40, 24), 64), ((12, 24), 32), ((128, 16), 16), ((16, 16), 16),
                                             ((192, 128), 128), ((128, 96), 128)])
def test_value_tile_width(dims, block_dv):
    """A value head dim with masked columns in a tile narrower than the q/k tile takes the
    q/k tile's width (narrower gave wrong results on an H100); the others their power of two."""
    from flashtile.backends.triton.launch.attention import block_dv_of

    assert block_dv_of(*dims) == block_dv


@pytest.mark.parametrize("dims", [(24, 12), (64, 8), (40, 9)], ids=str)
def test_small_value_head_dims(backend, dims):
    # the widened value tile of these pairs, forward and backward, dense and varlen
    q, k, v = qkv(2, 70, 90, 4, 2, *dims, torch.float16)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=True), q, k, v, causal=True)
    lens_q, lens_k = [30, 0, 41], [50, 20, 41]
    q, k, v = (t[0, :n] for t, n in zip(qkv(1, 71, 111, 4, 2, *dims, torch.float16), (71, 111, 111)))
    check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 41, 50, causal=True),
                    q, k, v, ref_fn=packed_ref(lens_q, lens_k), causal=True)


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dims", PAIRS, ids=str)
@pytest.mark.parametrize("kind", ["full", "causal", "varlen"])
def test_value_head_dim_gpu(dtype, dims, kind):
    if kind == "varlen":
        lens_q, lens_k = [700, 0, 1500, 33], [900, 50, 1500, 0]
        q = torch.randn(sum(lens_q), 8, dims[0], device="cuda", dtype=dtype)
        k = torch.randn(sum(lens_k), 2, dims[0], device="cuda", dtype=dtype)
        v = torch.randn(sum(lens_k), 2, dims[1], device="cuda", dtype=dtype)
        cq, ck = cu(lens_q).cuda(), cu(lens_k).cuda()
        check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k),
                                                               causal=True),
                        q, k, v, ref_fn=packed_ref(lens_q, lens_k), causal=True)
        return
    causal = kind == "causal"
    q = torch.randn(2, 1500, 8, dims[0], device="cuda", dtype=dtype)
    k = torch.randn(2, 2100, 2, dims[0], device="cuda", dtype=dtype)
    v = torch.randn(2, 2100, 2, dims[1], device="cuda", dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.gpu
def test_value_head_dim_kvcache_gpu():
    batch, nheads, nheads_k, d, dv = 4, 16, 2, 192, 128
    lengths = torch.tensor([3000, 1, 700, 4095], dtype=torch.int32, device="cuda")
    k_cache = torch.randn(batch, 4096, nheads_k, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(batch, 4096, nheads_k, dv, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(batch, 1, nheads, d, dtype=torch.bfloat16, device="cuda")
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)
    for b in range(batch):
        n = int(lengths[b])
        args = (q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n])
        ref = attention_ref(*args, compute_dtype=torch.float64)
        low = attention_ref(*args, upcast=False)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, torch.bfloat16)
