"""Positions a row does not see contribute nothing to it, NaN and Inf included:
causal, sliding window, the next sequence of a packed batch, a block mask,
keys past seqused_k or cache_seqlens, left padding, and unused pages full of
NaN. Rows that do see a non-finite key or value get a non-finite output, as
the oracle gives (``attention_ref`` adds nothing for positions a row does not
see). Each test runs on the Triton kernels (interpreter, also with the
two-halves schedule) and on the tiled PyTorch path; the dense tests also
through PyTorch's fused CPU kernel, which the tiled path then takes over
from."""

import pytest
import torch
from helpers import check_rows, cu, max_err, poison, rounding_floor

from flashtile import (
    BlockMask,
    block_sparse_attn_func,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flashtile.testing import attention_ref


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(24, 0)), dict(window_size=(8, 8)),
                                dict(causal=True, window_size=(40, 0), softcap=5.0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dense(backend, kw, dtype):
    q = torch.randn(2, 200, 4, 32, dtype=dtype)
    k = poison(torch.randn(2, 200, 2, 32, dtype=dtype), [150])
    v = poison(poison(torch.randn(2, 200, 2, 32, dtype=dtype), [150]), [70], float("inf"))
    out = flash_attn_func(q, k, v, **kw)
    ref = attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    assert (~ref.isfinite()).any(), "the test should have rows that see a poisoned key"
    check_rows(out, ref, attention_ref(q, k, v, upcast=False, **kw), dtype)


def test_dense_gradient_of_rows(backend):
    # dQ of a row comes from the keys it sees: a poisoned key it does not see leaves it finite
    q = torch.randn(1, 160, 2, 32, requires_grad=True)
    k = poison(torch.randn(1, 160, 2, 32), [120]).requires_grad_()
    v = poison(torch.randn(1, 160, 2, 32), [120]).requires_grad_()
    out = flash_attn_func(q, k, v, causal=True)
    dq, = torch.autograd.grad(out, q, torch.ones_like(out).masked_fill(~out.isfinite(), 0.0))
    rows = ~dq.isfinite().all(-1).all(-1)[0]
    assert torch.equal(rows, torch.arange(160) >= 120)
    qr = q.detach()[:, :120].clone().requires_grad_()
    ref = attention_ref(qr, k.detach()[:, :120], v.detach()[:, :120], causal=True, compute_dtype=torch.float64)
    dq_ref, = torch.autograd.grad(ref, qr, torch.ones_like(ref))
    assert max_err(dq[:, :120], dq_ref) <= 1e-4 * dq_ref.abs().max().item()


@pytest.mark.parametrize("call", [dict(causal=True), dict(window_size=(30, 0)), dict(causal=True, seqlen_q=120)],
                         ids=["causal", "window", "bottom_right"])
@pytest.mark.parametrize("where", ["k", "v", "dout"])
def test_dense_through_the_fused_cpu_kernel(monkeypatch, where, call):
    """A non-finite key, value or dO row reaches the output and dQ of exactly the rows
    that see it, as on the tiled path: PyTorch's fused CPU kernel (which dense causal and
    windowed CPU calls take) would spread a key's or value's through ``0 * NaN`` to rows
    that do not, and the call then goes to the tiled path."""
    from flashtile import set_batch_invariant

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    call = dict(call)
    seqlen_q = call.pop("seqlen_q", 150)
    q, k, v = torch.randn(1, seqlen_q, 2, 32), torch.randn(1, 150, 2, 32), torch.randn(1, 150, 2, 32)
    dout = torch.randn(1, seqlen_q, 2, 32)
    # key 60 (dO: row 60); the first row that sees key 60 (bottom-right: row i sees keys <= i + 30)
    dict(dout=dout, k=k, v=v)[where][:, 60] = float("nan")
    first = 60 if where == "dout" else 60 - (150 - seqlen_q)

    def run():
        qs = q.clone().requires_grad_()
        out = flash_attn_func(qs, k, v, **call)
        return out.detach(), torch.autograd.grad(out, qs, dout)[0]

    fused = run()
    previous = set_batch_invariant(True)  # every CPU call on the tiled path
    try:
        tiled = run()
    finally:
        set_batch_invariant(previous)
    for name, f, t in list(zip(["out", "dq"], fused, tiled))[where == "dout":]:
        bad_rows = (~t.isfinite()).any(-1).any(-1)[0]
        assert bad_rows.any(), "the test should have rows that see the poisoned position"
        assert not bad_rows[:first].any(), f"{name}: rows before {first} do not see it"
        assert torch.equal(f.isfinite(), t.isfinite()), f"{name}: non-finite positions differ"
        assert max_err(f[t.isfinite()], t[t.isfinite()]) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_neighbours(backend, causal):
    # a poisoned sequence in a packed batch touches none of its neighbours
    lens_q, lens_k = [40, 30, 50], [60, 45, 50]
    q = torch.randn(sum(lens_q), 4, 32, dtype=torch.float16)
    k, v = (torch.randn(sum(lens_k), 2, 32, dtype=torch.float16) for _ in range(2))
    start = cu(lens_k).tolist()[1]
    k, v = poison(k, range(start, start + 45)), poison(v, range(start, start + 45))  # all of sequence 1
    out = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 50, 60, causal=causal)
    cq = cu(lens_q).tolist()
    assert out[:cq[1]].isfinite().all() and out[cq[2]:].isfinite().all()
    assert (~out[cq[1]:cq[2]].isfinite()).all(-1).all(-1).any()


def test_seqused_k_and_paged(backend):
    # keys past seqused_k, the unused rows of the last page and the unused pages hold NaN
    lens_q, used, page = [20, 33], [37, 50], 16
    q = torch.randn(sum(lens_q), 4, 32)
    k = torch.full((10, page, 2, 32), float("nan"))
    v = torch.full((10, page, 2, 32), float("nan"))
    table = torch.tensor([[7, 2, 9, 0], [1, 4, 8, 3]], dtype=torch.int32)
    keys, values = [], []
    for b, n in enumerate(used):
        kb, vb = torch.randn(n, 2, 32), torch.randn(n, 2, 32)
        for j in range(n):
            k[table[b, j // page], j % page], v[table[b, j // page], j % page] = kb[j], vb[j]
        keys.append(kb)
        values.append(vb)
    out = flash_attn_varlen_func(q, k, v, cu(lens_q), cu([64, 64]), 33, 64, causal=True, block_table=table,
                                 seqused_k=torch.tensor(used, dtype=torch.int32))
    assert out.isfinite().all()
    cq = cu(lens_q).tolist()
    for b in range(2):
        ref = attention_ref(q[None, cq[b]:cq[b + 1]], keys[b][None], values[b][None], causal=True,
                            compute_dtype=torch.float64)
        assert max_err(out[None, cq[b]:cq[b + 1]], ref) <= 1e-5


def test_block_mask(backend):
    if backend == "triton_halves":
        pytest.skip("the block-sparse kernels take their own tiles")
    q = torch.randn(1, 128, 2, 32)
    k, v = (poison(torch.randn(1, 128, 2, 32), [50]) for _ in range(2))
    # keys 32-63 are seen by the query blocks 1 and 3 only (partly, in block 3)
    layout = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    mask = BlockMask.from_layout(layout[None, None].expand(1, 2, 4, 4), 32, 128, 128)
    out = block_sparse_attn_func(q, k, v, mask, causal=True)
    ref = attention_ref(q, k, v, attn_bias=mask.causal_part().to_dense(), compute_dtype=torch.float64)
    check_rows(out, ref, attention_ref(q, k, v, attn_bias=mask.causal_part().to_dense(), upcast=False),
               torch.float32)
    assert out[:, :32].isfinite().all() and out[:, 64:96].isfinite().all()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache(backend, paged):
    # the cache past cache_seqlens, before cache_leftpad and in unused pages is NaN; new tokens causal
    batch, nheads, nheads_k, d, page = 2, 4, 2, 32, 16
    lengths = torch.tensor([30, 50], dtype=torch.int32)
    leftpad = torch.tensor([5, 0], dtype=torch.int32)
    k_cache = torch.full((batch, 128, nheads_k, d), float("nan"))
    v_cache = torch.full((batch, 128, nheads_k, d), float("nan"))
    for b in range(batch):
        k_cache[b, leftpad[b]:lengths[b]] = torch.randn(int(lengths[b] - leftpad[b]), nheads_k, d)
        v_cache[b, leftpad[b]:lengths[b]] = torch.randn(int(lengths[b] - leftpad[b]), nheads_k, d)
    q = torch.randn(batch, 3, nheads, d)
    k_new, v_new = (torch.randn(batch, 3, nheads_k, d) for _ in range(2))
    kw = dict(k=k_new, v=v_new, cache_seqlens=lengths, cache_leftpad=leftpad, causal=True, num_splits=2)
    if paged:
        table = torch.randperm(batch * 8 + 4)[:batch * 8].reshape(batch, 8).to(torch.int32)
        k_pages = torch.full((batch * 8 + 4, page, nheads_k, d), float("nan"))
        v_pages = torch.full((batch * 8 + 4, page, nheads_k, d), float("nan"))
        k_pages[table.flatten().long()] = k_cache.reshape(batch * 8, page, nheads_k, d)
        v_pages[table.flatten().long()] = v_cache.reshape(batch * 8, page, nheads_k, d)
        out = flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table, **kw)
    else:
        out = flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert out.isfinite().all()
    for b in range(batch):
        lo, n = int(leftpad[b]), int(lengths[b])
        keys = torch.cat([k_cache[b, lo:n], k_new[b]])[None]
        values = torch.cat([v_cache[b, lo:n], v_new[b]])[None]
        ref = attention_ref(q[b:b + 1], keys, values, causal=True, compute_dtype=torch.float64)
        assert max_err(out[b:b + 1], ref) <= 1e-5


@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("kw", [dict(causal=True, window_size=(37, 0)), dict(window_size=(100, 2)),
                                dict(causal=True)], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kvcache_window(backend, seqlen_q, kw, num_splits):
    # decoding over many key tiles: the keys just outside every row's window (and far outside it)
    # are NaN or Inf, the tiles inside it clean; then one key inside the window of one row only
    lengths = torch.tensor([300, 170], dtype=torch.int32)
    q = torch.randn(2, seqlen_q, 4, 32)
    k, v = torch.randn(2, 300, 2, 32), torch.randn(2, 300, 2, 32)
    left = kw.get("window_size", (-1, -1))[0]
    for b, n in enumerate(lengths.tolist()):
        if left >= 0:
            first_seen = n - seqlen_q - left  # the left edge of the first query's window
            for pos in (3, first_seen - 1):
                k[b, pos], v[b, pos] = float("nan"), float("inf")
        k[b, n:], v[b, n:] = float("nan"), float("nan")  # past cache_seqlens
    call = dict(cache_seqlens=lengths, num_splits=num_splits, **kw)
    out = flash_attn_with_kvcache(q, k, v, **call)
    assert out.isfinite().all()
    for b, n in enumerate(lengths.tolist()):
        ref = attention_ref(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], compute_dtype=torch.float64, **kw)
        assert max_err(out[b:b + 1], ref) <= 1e-5
    if seqlen_q > 1:  # a NaN value the last query sees and the first does not (causal: right of it)
        n = int(lengths[0])
        v[0, n - 1, 0, 5] = float("nan")
        out = flash_attn_with_kvcache(q, k, v, **call)
        ref = attention_ref(q[:1], k[:1, :n], v[:1, :n], compute_dtype=torch.float64, **kw)
        assert torch.equal(out[:1].isfinite().all(-1), ref.isfinite().all(-1))
        assert max_err(out[:1][ref.isfinite()], ref[ref.isfinite()]) <= 1e-5


# --- on a CUDA GPU with the compiled kernels (marker ``gpu``) ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(300, 0)), dict(window_size=(100, 100))],
                         ids=str)
def test_dense_gpu(head_dim, kw):
    q = torch.randn(2, 1000, 8, head_dim, device="cuda", dtype=torch.bfloat16)
    k = poison(torch.randn(2, 1000, 2, head_dim, device="cuda", dtype=torch.bfloat16), [700])
    v = poison(torch.randn(2, 1000, 2, head_dim, device="cuda", dtype=torch.bfloat16), [700, 300])
    out = flash_attn_func(q, k, v, **kw)
    check_rows(out, attention_ref(q, k, v, compute_dtype=torch.float64, **kw),
               attention_ref(q, k, v, upcast=False, **kw), torch.bfloat16)


@pytest.mark.gpu
def test_paged_nan_pages_gpu():
    batch, nheads, nheads_k, d, page = 4, 16, 2, 128, 64
    lengths = torch.tensor([3000, 1, 700, 4000], dtype=torch.int32, device="cuda")
    k_pages = torch.full((batch * 64 + 8, page, nheads_k, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_pages = torch.full_like(k_pages, float("nan"))
    table = torch.randperm(batch * 64 + 8, device="cuda")[:batch * 64].reshape(batch, 64).to(torch.int32)
    keys, values = [], []
    for b in range(batch):
        n = int(lengths[b])
        kb, vb = (torch.randn(n, nheads_k, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        pages = table[b, :(n + page - 1) // page].long()
        k_pad = torch.full((len(pages) * page, nheads_k, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        v_pad = k_pad.clone()
        k_pad[:n], v_pad[:n] = kb, vb
        k_pages[pages], v_pages[pages] = k_pad.view(-1, page, nheads_k, d), v_pad.view(-1, page, nheads_k, d)
        keys.append(kb)
        values.append(vb)
    q = torch.randn(batch, 1, nheads, d, device="cuda", dtype=torch.bfloat16)
    out = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table)
    assert out.isfinite().all()
    for b in range(batch):
        ref = attention_ref(q[b:b + 1], keys[b][None], values[b][None], compute_dtype=torch.float64)
        low = attention_ref(q[b:b + 1], keys[b][None], values[b][None], upcast=False)
        assert max_err(out[b:b + 1], ref) <= 2 * max_err(low, ref) + rounding_floor(ref, torch.bfloat16)
