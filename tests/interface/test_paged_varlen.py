"""flash_attn_varlen_func over a paged KV cache (``block_table``) and with
``seqused_k``: chunked prefill and prefix caching as serving engines run them,
against attention_ref per sequence with the accuracy rule. Each test runs on
the Triton kernels (interpreter, also with the two-halves schedule) and on the
tiled PyTorch path."""

import pytest
import torch
from helpers import check_attention, cu, max_err, packed_ref, rounding_floor

from flashtile import flash_attn_varlen_func
from flashtile.testing import attention_ref


def paged_cache(lens_k, page_size, nheads_k, d, dv, dtype, spare_pages=3):
    """k, v of each sequence (lists), and the same in a paged cache whose pages are
    shuffled, with unused pages (and the unused rows of the last pages) full of NaN:
    nothing a sequence does not own may reach its rows."""
    max_pages = max(1, max((n + page_size - 1) // page_size for n in lens_k))
    num_pages = len(lens_k) * max_pages + spare_pages
    k_cache = torch.full((num_pages, page_size, nheads_k, d), float("nan"), dtype=dtype)
    v_cache = torch.full((num_pages, page_size, nheads_k, dv), float("nan"), dtype=dtype)
    table = torch.randperm(num_pages)[:len(lens_k) * max_pages].reshape(len(lens_k), max_pages).to(torch.int32)
    ks, vs = [], []
    for b, n in enumerate(lens_k):
        k, v = torch.randn(n, nheads_k, d, dtype=dtype), torch.randn(n, nheads_k, dv, dtype=dtype)
        for j in range(n):
            page, row = int(table[b, j // page_size]), j % page_size
            k_cache[page, row], v_cache[page, row] = k[j], v[j]
        ks.append(k)
        vs.append(v)
    return ks, vs, k_cache, v_cache, table


def check_per_sequence(out, q, ks, vs, lens_q, dtype, **kw):
    """Each sequence's rows of the packed ``out`` against the oracle (options ``kw``) on
    its own keys ``ks[b]``, ``vs[b]``."""
    cq = cu(lens_q).tolist()
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        args = (q[None, cq[b]:cq[b + 1]], ks[b][None].to(q.device), vs[b][None].to(q.device))
        ref = attention_ref(*args, compute_dtype=torch.float64, **kw)
        low = attention_ref(*args, upcast=False, **kw)
        assert max_err(out[None, cq[b]:cq[b + 1]], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, dtype)


@pytest.mark.parametrize("page_size", [16, 64, 256, 5])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paged(backend, page_size, causal):
    # ragged lengths, a sequence without keys, one without queries, queries longer than keys
    lens_q, lens_k = [13, 40, 0, 1, 57], [70, 0, 30, 129, 41]
    dtype = torch.float16
    ks, vs, k_cache, v_cache, table = paged_cache(lens_k, page_size, 2, 48, 48, dtype)
    q = torch.randn(sum(lens_q), 6, 48, dtype=dtype)
    out, lse, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                         causal=causal, block_table=table, return_attn_probs=True)
    assert not torch.isnan(out).any()
    check_per_sequence(out, q, ks, vs, lens_q, dtype, causal=causal)


@pytest.mark.parametrize("page_size", [64, 192, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paged_descriptors(monkeypatch, page_size, causal):
    """Pages of a multiple of 64 keys are read through tensor descriptors over the stacked
    pages where contiguous keys would take descriptors (on Hopper from 1k keys a row; forced
    here under the interpreter), key tiles within a page; the NaN in rows past a sequence's
    keys stays out."""
    from helpers import set_switch

    from flashtile.backends.triton.launch import choose

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_switch(monkeypatch, "FLASHTILE_FWD_TMA", "1")
    monkeypatch.setattr(choose, "_last", {})
    lens_q, lens_k = [13, 40, 0, 57], [70, 0, 30, 300]
    dtype = torch.bfloat16
    ks, vs, k_cache, v_cache, table = paged_cache(lens_k, page_size, 2, 48, 40, dtype)
    q = torch.randn(sum(lens_q), 4, 48, dtype=dtype)
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                 causal=causal, block_table=table)
    name = "fwd_tma" + ("_causal" if causal else "") + "_short"
    assert choose.chosen_config(name) is not None, "the descriptor launch should have run"
    assert page_size % choose.chosen_config(name).block_n == 0
    check_per_sequence(out, q, ks, vs, lens_q, dtype, causal=causal)


def test_paged_options_and_seqused(backend):
    # window, softcap, ALiBi, sinks, a value head dim of its own, and seqused_k shorter than the pages
    lens_q, lens_k, used = [20, 9, 31], [64, 64, 64], [50, 0, 64]
    ks, vs, k_cache, v_cache, table = paged_cache(used, 16, 2, 32, 40, torch.bfloat16)
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.bfloat16)
    kw = dict(window_size=(24, 3), softcap=5.0, alibi_slopes=torch.rand(4) * 0.3)
    sinks = torch.randn(4) * 2
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu(lens_q), cu(lens_k), max(lens_q), 64, block_table=table,
                                 seqused_k=torch.tensor(used, dtype=torch.int32), sinks=sinks, **kw)
    check_per_sequence(out, q, ks, vs, lens_q, torch.bfloat16, sinks=sinks, **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqused_k(backend, causal):
    # sequence b uses the first seqused_k[b] of the keys cu_seqlens_k gives it, forward and backward;
    # the keys it leaves have zero gradients
    lens_q, lens_k, used = [17, 30, 8, 12], [40, 30, 25, 16], [33, 30, 0, 5]
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.float16)
    k, v = (torch.randn(sum(lens_k), 2, 32, dtype=torch.float16) for _ in range(2))
    seqused = torch.tensor(used, dtype=torch.int32)
    ck = cu(lens_k).tolist()
    keep = torch.cat([torch.arange(n) < u for n, u in zip(lens_k, used)])

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(used), causal=causal,
                                      seqused_k=seqused)

    def ref(q, k, v, **kw):
        # the used keys alone, packed
        return packed_ref(lens_q, used, causal=causal)(q, k[keep], v[keep], **kw)

    check_attention(fn, q, k, v, ref_fn=ref)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(q, k, v).float().sum().backward()
    assert torch.equal(k.grad[~keep], torch.zeros_like(k.grad[~keep]))
    assert torch.equal(v.grad[~keep], torch.zeros_like(v.grad[~keep]))
    assert ck[-1] == k.shape[0]


def test_paged_backward_is_refused():
    _, _, k_cache, v_cache, table = paged_cache([20], 16, 2, 16, 16, torch.float32)
    q = torch.randn(5, 2, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward pass through a paged KV cache"):
        flash_attn_varlen_func(q, k_cache, v_cache, cu([5]), cu([20]), 5, 20, block_table=table)
    with torch.no_grad():
        flash_attn_varlen_func(q, k_cache, v_cache, cu([5]), cu([20]), 5, 20, block_table=table)


@pytest.mark.parametrize("case, error, match", [
    ("table_dtype", TypeError, "block_table must be int32"),
    ("table_rows", ValueError, "block_table must have one row per sequence"),
    ("page_out_of_range", ValueError, "block_table names page"),
    ("too_many_keys", ValueError, "more than block_table's"),
    ("kv_3d", ValueError, "must be a paged cache"),
    ("seqused_dtype", TypeError, "seqused_k must be int32"),
    ("seqused_shape", ValueError, r"seqused_k must have shape \(2,\)"),
    ("seqused_negative", ValueError, "seqused_k must be >= 0"),
    ("seqused_over", ValueError, "seqused_k exceeds the keys"),
])
def test_bad_input(case, error, match):
    _, _, k_cache, v_cache, table = paged_cache([20, 30], 16, 2, 16, 16, torch.float32)
    q = torch.randn(9, 2, 16)
    args = dict(q=q, k=k_cache, v=v_cache, cu_seqlens_q=cu([4, 5]), cu_seqlens_k=cu([20, 30]), max_seqlen_q=5,
                max_seqlen_k=30, block_table=table)
    if case == "table_dtype":
        args["block_table"] = table.long()
    elif case == "table_rows":
        args["block_table"] = table[:1]
    elif case == "page_out_of_range":
        args["block_table"] = table.clone().fill_(k_cache.shape[0])
    elif case == "too_many_keys":
        args.update(cu_seqlens_k=cu([20, 40]), max_seqlen_k=40)
    elif case == "kv_3d":
        args.update(k=k_cache.flatten(0, 1), v=v_cache.flatten(0, 1))
    else:
        k, v = torch.randn(50, 2, 16), torch.randn(50, 2, 16)
        used = {"seqused_dtype": torch.tensor([1, 2]), "seqused_shape": torch.tensor([1], dtype=torch.int32),
                "seqused_negative": torch.tensor([-1, 2], dtype=torch.int32),
                "seqused_over": torch.tensor([21, 2], dtype=torch.int32)}[case]
        args.update(k=k, v=v, block_table=None, seqused_k=used)
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(**args)


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("loads", ["default", "descriptors"])
def test_paged_gpu(monkeypatch, dtype, head_dim, page_size, loads):
    """Causal prefill over a paged cache whose unused rows hold NaN; ``descriptors``: reads
    through tensor descriptors over the stacked pages (FLASHTILE_FWD_TMA=1; pages of 16 keys
    keep pointer loads)."""
    if loads == "descriptors":
        from helpers import set_switch

        set_switch(monkeypatch, "FLASHTILE_FWD_TMA", "1")
    lens_q, lens_k = [300, 1, 0, 700], [1000, 2000, 77, 700]
    ks, vs, k_cache, v_cache, table = paged_cache(lens_k, page_size, 2, head_dim, head_dim, dtype)
    q = torch.randn(sum(lens_q), 8, head_dim, dtype=dtype)
    q, k_cache, v_cache, table = q.cuda(), k_cache.cuda(), v_cache.cuda(), table.cuda()
    out = flash_attn_varlen_func(q, k_cache, v_cache, cu(lens_q).cuda(), cu(lens_k).cuda(), max(lens_q),
                                 max(lens_k), causal=True, block_table=table)
    check_per_sequence(out, q, ks, vs, lens_q, dtype, causal=True)


@pytest.mark.gpu
def test_seqused_k_gpu():
    lens_q, lens_k, used = [500, 1200, 8], [1500, 1200, 300], [900, 1200, 0]
    q = torch.randn(sum(lens_q), 8, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(sum(lens_k), 2, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    seqused = torch.tensor(used, dtype=torch.int32, device="cuda")
    keep = torch.cat([torch.arange(n) < u for n, u in zip(lens_k, used)]).cuda()

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu(lens_q).cuda(), cu(lens_k).cuda(), max(lens_q), max(used),
                                      causal=True, seqused_k=seqused)

    check_attention(fn, q, k, v, ref_fn=lambda q, k, v, **kw: packed_ref(lens_q, used, causal=True)(
        q, k[keep], v[keep], **kw))
