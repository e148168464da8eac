"""Variable-length batches (flash_attn_varlen_*), the padding helpers, and the
bad inputs of the new options."""

import pytest
import torch
from helpers import check_attention, cu, packed_ref, set_switch

from flashtile import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    pad_input,
    scaled_dot_product_attention,
    unpad_input,
)
from flashtile.testing import attention_ref

CASES = {
    # lengths of q and k per sequence: ragged, a zero-length sequence, cross attention
    "self": ([77, 1, 130, 0, 45], [77, 1, 130, 0, 45]),
    "cross": ([30, 64, 5], [100, 20, 70]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_matches_per_sequence_reference(backend, case, causal, dtype):
    lens_q, lens_k = CASES[case]
    q = torch.randn(sum(lens_q), 4, 40, dtype=dtype)
    k, v = (torch.randn(sum(lens_k), 2, 40, dtype=dtype) for _ in range(2))

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=causal)

    check_attention(fn, q, k, v, ref_fn=packed_ref(lens_q, lens_k, causal=causal))


def test_varlen_with_window_alibi_softcap_dropout(backend):
    lens_q, lens_k = [50, 90, 3], [60, 90, 40]
    q = torch.randn(sum(lens_q), 4, 32)
    k, v = (torch.randn(sum(lens_k), 4, 32) for _ in range(2))
    slopes = torch.rand(3, 4)
    kw = dict(causal=True, window_size=(20, 0), softcap=3.0)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    _, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 90, 90, dropout_p=0.2,
                                             alibi_slopes=slopes, return_attn_probs=True, **kw)
    assert lse.shape == (4, sum(lens_q)) and s_dmask.shape == (3, 4, 90, 90)

    def fn(q, k, v):
        torch.set_rng_state(state)
        return flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 90, 90, dropout_p=0.2,
                                      alibi_slopes=slopes, **kw)

    def ref(q, k, v, **ref_kw):  # per sequence, with that sequence's part of the dropout pattern
        outs, cq, ck = [], cu(lens_q).tolist(), cu(lens_k).tolist()
        for i in range(3):
            nq, nk = lens_q[i], lens_k[i]
            outs.append(attention_ref(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                      alibi_slopes=slopes[i], dropout_p=0.2,
                                      dropout_mask=s_dmask[i:i + 1, :, :nq, :nk] >= 0, **kw, **ref_kw)[0])
        return torch.cat(outs)

    check_attention(fn, q, k, v, ref_fn=ref)


def test_varlen_alibi_one_slope_per_head(backend):
    # slopes (nheads,) shared by every sequence of the batch, not only the first
    lens_q, lens_k = [20, 9, 31, 14], [50, 0, 64, 14]
    q = torch.randn(sum(lens_q), 4, 32)
    k, v = (torch.randn(sum(lens_k), 2, 32) for _ in range(2))
    slopes = torch.rand(4)
    check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 31, 64,
                                                           alibi_slopes=slopes),
                    q, k, v, ref_fn=packed_ref(lens_q, lens_k, alibi_slopes=slopes))


def test_varlen_packed_variants_and_lse(backend):
    lens = [33, 70, 12]
    qkv = torch.randn(sum(lens), 3, 2, 16)
    out, lse, _ = flash_attn_varlen_qkvpacked_func(qkv, cu(lens), 70, causal=True, return_attn_probs=True)
    out2 = flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu(lens), cu(lens), 70, 70, causal=True)
    torch.testing.assert_close(out, out2)
    # each sequence alone through the dense API gives the same rows and LSE
    c = cu(lens).tolist()
    for i in range(3):
        o, l_i, _ = flash_attn_func(*(qkv[None, c[i]:c[i + 1], j] for j in range(3)), causal=True,
                                    return_attn_probs=True)
        torch.testing.assert_close(out[c[i]:c[i + 1]], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, c[i]:c[i + 1]], l_i[0], atol=1e-5, rtol=1e-5)


def test_unpad_pad_roundtrip_and_padded_equivalence(backend):
    batch, seqlen = 3, 60
    mask = torch.arange(seqlen)[None, :] < torch.tensor([60, 17, 41])[:, None]
    x = torch.randn(batch, seqlen, 3, 2, 16)  # (b, s, qkv, h, d)
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    assert packed.shape == (118, 3, 2, 16)
    assert cu_seqlens.tolist() == [0, 60, 77, 118] and max_seqlen == 60 and seqused.tolist() == [60, 17, 41]
    assert torch.equal(pad_input(packed, indices, batch, seqlen), x * mask[:, :, None, None, None])
    # varlen over the packed tokens == padded attention with a key-padding mask, at real tokens
    out = flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, max_seqlen)
    q, k, v = x.unbind(2)
    padded = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(pad_input(out, indices, batch, seqlen), padded * mask[:, :, None, None],
                               atol=1e-5, rtol=1e-5)


BAD = [
    (lambda q, k, v: flash_attn_func(q[None], k[None], v[None], window_size=5), ValueError, "window_size"),
    (lambda q, k, v: flash_attn_func(q[None], k[None], v[None], softcap=-1.0), ValueError, "softcap"),
    (lambda q, k, v: flash_attn_func(q[None], k[None], v[None], alibi_slopes=torch.rand(3)), ValueError,
     "alibi_slopes must have shape"),
    (lambda q, k, v: flash_attn_func(q[None], k[None], v[None], alibi_slopes=torch.rand(2).half()), TypeError,
     "alibi_slopes must be float32"),
    (lambda q, k, v: flash_attn_func(q[None], k[None], v[None], dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: flash_attn_varlen_func(q, k, v, cu([10]).long(), cu([10]), 10, 10), TypeError,
     "cu_seqlens_q must be int32"),
    (lambda q, k, v: flash_attn_varlen_func(q, k, v, cu([4, 6]), cu([10]), 6, 10), ValueError,
     "same length"),
    (lambda q, k, v: flash_attn_varlen_func(q, k, v, cu([4, 7]), cu([4, 7]), 5, 7), ValueError,
     "end at the total length"),
    (lambda q, k, v: flash_attn_varlen_func(q, k, v, cu([6, 4]), cu([6, 4]), 5, 6), ValueError,
     "max_seqlen_q=5 is smaller"),
    (lambda q, k, v: flash_attn_varlen_func(q[None], k, v, cu([10]), cu([10]), 10, 10), ValueError,
     "q must be 3-D"),
    (lambda q, k, v: scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                  v.transpose(0, 1)[None], attn_mask=torch.ones(10, 9)),
     ValueError, "does not broadcast"),
    (lambda q, k, v: scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                  v.transpose(0, 1)[None], attn_mask=torch.ones(10, 10).int()),
     TypeError, "attn_mask must be bool or floating point"),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_option_inputs(call, exc, match):
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    with pytest.raises(exc, match=match):
        call(q, k, v)


@pytest.mark.parametrize("mode", ["1", "2"], ids=["in_kernel", "host"])
def test_varlen_tensor_descriptors(monkeypatch, mode):
    # descriptors over a packed batch: tiles that run past a sequence must not leak into it
    # (the backward kernels have in-kernel descriptors only)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_switch(monkeypatch, "FLASHTILE_FWD_TMA", mode)
    set_switch(monkeypatch, "FLASHTILE_BWD_TMA", "1" if mode == "1" else "0")
    lens_q, lens_k = [40, 27, 65], [50, 90, 33]  # at least 128 rows in all: descriptors are used
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.float16)
    k, v = (torch.randn(sum(lens_k), 2, 32, dtype=torch.float16) for _ in range(2))
    check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 65, 90, causal=True),
                    q, k, v, ref_fn=packed_ref(lens_q, lens_k, causal=True), backward=mode == "1")


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_gpu(causal, head_dim):
    from flashtile import flash_attn_varlen_func
    from flashtile.testing import attention_ref

    lens = [1, 700, 0, 2049, 128, 333]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 8 if i == 0 else 2, head_dim, device="cuda", dtype=torch.bfloat16)
               for i in range(3))

    def ref(q, k, v, **kw):
        c = cu.tolist()
        return torch.cat([attention_ref(q[None, c[i]:c[i + 1]], k[None, c[i]:c[i + 1]], v[None, c[i]:c[i + 1]],
                                        causal=causal, **kw)[0] for i in range(len(lens))])

    check_attention(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal),
                    q, k, v, ref_fn=ref)

