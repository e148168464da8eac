"""Block-sparse attention: the BlockMask type and the kernels' SPARSE path, forward and
every gradient against attention_ref given the equivalent dense element mask.

CPU tests run the Triton kernels under the interpreter and the tiled PyTorch
path; the ``gpu`` ones run the compiled kernels at larger sizes.
"""

import pytest
import torch
from helpers import check_attention

import flashtile
from flashtile import BlockMask, block_sparse_attention, block_sparse_attn_func, create_block_mask
from flashtile.masks.block_mask import EMPTY, FULL
from flashtile.testing import dropout_keep_mask


@pytest.fixture(params=["triton", "tiled"])
def backend(request, monkeypatch):
    """CPU tensors run the Triton kernels under the interpreter, or the tiled path without it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def qkv(b, sq, sk, h, hk, d, dtype=torch.float32, device="cpu"):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=device), torch.randn(b, sk, hk, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device))


def random_layout(b, h, sq, sk, block, density, device="cpu"):
    n_q, n_k = -(-sq // block), -(-sk // block)
    return torch.rand(b, h, n_q, n_k, device=device) < density


def check_sparse(mask: BlockMask, q, k, v, causal=False, **kwargs):
    dense = (mask.causal_part() if causal else mask).to_dense()
    check_attention(lambda q, k, v: block_sparse_attn_func(q, k, v, mask, causal=causal, **kwargs), q, k, v,
                    attn_bias=dense, **kwargs)


# --- the mask type ---------------------------------------------------------------

@pytest.mark.parametrize("lengths", [(100, 130), (128, 64), (203, 77)], ids=str)
@pytest.mark.parametrize("block", [16, 32, (32, 64)], ids=str)
def test_mask_builders_agree(lengths, block):
    sq, sk = lengths
    diag = sk - sq
    causal = BlockMask.causal(sq, sk, block)
    by_predicate = create_block_mask(lambda b, h, i, j: j <= i + diag, None, None, sq, sk, block)
    expected = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + diag
    assert torch.equal(causal.to_dense()[0, 0], expected)
    assert torch.equal(by_predicate.tiles, causal.tiles)
    assert torch.equal(by_predicate.to_dense(), causal.to_dense())
    # tile kinds follow the elements: full = all in-bounds pairs, empty = none
    bq, bk = causal.block_size
    for qb in range(causal.tiles.shape[2]):
        for kb in range(causal.tiles.shape[3]):
            elems = expected[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            kind = causal.tiles[0, 0, qb, kb].item()
            inside = (kb + 1) * bk <= sk
            assert (kind == FULL) == (bool(elems.all()) and inside)
            assert (kind == EMPTY) == (not bool(elems.any()))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 3)], ids=str)
def test_combinations_match_dense(shape):
    sq, sk, block = 150, 97, 32
    a = BlockMask.from_layout(random_layout(*shape, sq, sk, block, 0.5), block, sq, sk)
    b = create_block_mask(lambda b_, h, i, j: (i * 7 + j * 3 + h) % 5 != 0, None, shape[1], sq, sk, block)
    c = BlockMask.causal(sq, sk, block, align="top_left")
    for combined, expected in [(a & b, a.to_dense() & b.to_dense()), (a | b, a.to_dense() | b.to_dense()),
                               (a & c, a.to_dense() & c.to_dense()), ((a | b) & c,
                                                                      (a.to_dense() | b.to_dense()) & c.to_dense())]:
        assert torch.equal(combined.to_dense(), expected.expand(combined.to_dense().shape))
    assert 0 < (a & b).density() <= a.density() <= (a | b).density() <= 1


def test_patterns_deduplicated_and_lists_consistent():
    mask = BlockMask.causal(512, 512, 32)
    assert mask.patterns.shape[0] == 1  # every diagonal tile shares one pattern
    lists = mask.kernel_lists()
    tiles = mask.tiles[0, 0]
    for qb in range(tiles.shape[0]):
        n_full, n_part = lists.fwd_full[0, 0, qb, 0].item(), lists.fwd_part[0, 0, qb, 0].item()
        assert lists.fwd_full[0, 0, qb, 1:1 + n_full].tolist() == (tiles[qb] == FULL).nonzero().flatten().tolist()
        pairs = lists.fwd_part[0, 0, qb, 1:1 + 2 * n_part].reshape(-1, 2)
        assert pairs[:, 0].tolist() == (tiles[qb] >= 0).nonzero().flatten().tolist()
        assert pairs[:, 1].tolist() == tiles[qb][tiles[qb] >= 0].tolist()
    for kb in range(tiles.shape[1]):
        n_full = lists.bwd_full[0, 0, kb, 0].item()
        assert lists.bwd_full[0, 0, kb, 1:1 + n_full].tolist() == (tiles[:, kb] == FULL).nonzero().flatten().tolist()


@pytest.mark.parametrize("cols", [16, 32, 64, 128])
def test_pattern_bits(cols):
    from flashtile.masks.block_mask import pack_bits

    patterns = torch.rand(3, 16, cols) < 0.5
    words = pack_bits(patterns)
    assert words.dtype == torch.int32 and words.shape == (3, 16, -(-cols // 32))
    col = torch.arange(cols)
    unpacked = (words[..., col // 32].to(torch.int64) >> (col % 32)) & 1
    assert torch.equal(unpacked.bool(), patterns)


def test_predicate_memory_is_chunked(monkeypatch):
    # the predicate never sees the whole score matrix at once
    import flashtile.masks.block_mask as bm

    monkeypatch.setattr(bm, "_CHUNK_ELEMENTS", 64 * 1024)
    seen = []

    def mod(b, h, i, j):
        seen.append(i.numel() * j.numel())
        return (i // 48) == (j // 48)

    mask = create_block_mask(mod, None, None, 1000, 1000, 32)
    assert max(seen) <= 64 * 1024 and len(seen) > 1
    assert torch.equal(mask.to_dense()[0, 0], (torch.arange(1000)[:, None] // 48) == (torch.arange(1000)[None] // 48))


# --- attention -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block", [32, (64, 32), 64], ids=str)
def test_random_layout(backend, dtype, causal, block):
    sq, sk = (113, 203) if causal else (203, 77)
    bq, bk = (block, block) if isinstance(block, int) else block
    layout = torch.rand(2, 4, -(-sq // bq), -(-sk // bk)) < 0.4
    mask = BlockMask.from_layout(layout, block, sq, sk)
    q, k, v = qkv(2, sq, sk, 4, 2, 40, dtype)
    check_sparse(mask, q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [16, 59, 128])
def test_predicate_per_head(backend, head_dim):
    # many partial tiles with different patterns, one mask per head, MQA
    sq, sk = 96, 130
    mask = create_block_mask(lambda b, h, i, j: ((i // 5 + j // 3 + h) % 3 != 0) & (j <= i + 40 * h), 1, 3,
                             sq, sk, 32)
    assert mask.patterns.shape[0] > 3
    q, k, v = qkv(1, sq, sk, 3, 1, head_dim, torch.float16)
    check_sparse(mask, q, k, v)


def test_per_batch_mask_and_options(backend):
    sq = sk = 128
    mask = BlockMask.from_layout(random_layout(2, 1, sq, sk, 32, 0.5), 32, sq, sk)
    q, k, v = qkv(2, sq, sk, 2, 2, 32, torch.float16)
    q = q * 2
    slopes = torch.rand(2)
    check_sparse(mask, q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, softmax_scale=0.2)


def test_rows_without_keys_are_zero(backend):
    sq, sk = 100, 100
    layout = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    layout[..., 1, 2] = True
    layout[..., 3, :2] = True
    mask = BlockMask.from_layout(layout, 32, sq, sk)
    q, k, v = (t.requires_grad_() for t in qkv(1, sq, sk, 2, 2, 32))
    out, lse = block_sparse_attn_func(q, k, v, mask, return_softmax_lse=True)
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))
    assert torch.isinf(lse[..., :32]).all() and (lse[..., :32] < 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :32], torch.zeros_like(q.grad[:, :32]))
    check_sparse(mask, q.detach(), k.detach(), v.detach())
    # an all-empty mask
    empty = BlockMask.from_layout(torch.zeros(4, 4, dtype=torch.bool), 32, sq, sk)
    assert torch.equal(block_sparse_attn_func(q, k, v, empty), torch.zeros_like(q))


def test_sdpa_layout_twin(backend):
    sq, sk = 70, 150
    mask = BlockMask.from_layout(random_layout(1, 4, sq, sk, 32, 0.6), 32, sq, sk)
    q, k, v = qkv(1, sq, sk, 4, 2, 24, torch.bfloat16)

    def fn(q, k, v):
        return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, is_causal=True,
                                      enable_gqa=True).transpose(1, 2)

    check_attention(fn, q, k, v, attn_bias=mask.causal_part("top_left").to_dense())


def test_full_layout_equals_dense_kernel(backend):
    # every tile full: the sparse path computes dense attention
    sq, sk = 96, 160
    mask = BlockMask.from_layout(torch.ones(3, 5, dtype=torch.bool), 32, sq, sk)
    q, k, v = qkv(2, sq, sk, 2, 1, 32)
    out = block_sparse_attn_func(q, k, v, mask, causal=True)
    assert torch.allclose(out, flashtile.flash_attn_func(q, k, v, causal=True), atol=1e-5)


def test_dropout_matches_reference_with_recovered_mask(backend):
    sq, sk, p = 64, 96, 0.2
    mask = BlockMask.from_layout(random_layout(1, 2, sq, sk, 32, 0.7), 32, sq, sk)
    q, k, v = qkv(1, sq, sk, 2, 2, 16)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    seed = int(torch.randint(0, 2**31 - 1, ()))  # what the call draws
    bh = torch.arange(2)[:, None, None]
    keep = dropout_keep_mask(seed, bh, torch.arange(sq)[:, None], torch.arange(sk)[None], sq, sk, p)[None]

    def fn(q, k, v):
        torch.set_rng_state(state)
        return block_sparse_attn_func(q, k, v, mask, dropout_p=p)

    check_attention(fn, q, k, v, attn_bias=mask.to_dense(), dropout_p=p, dropout_mask=keep)


def test_sinks(backend):
    q, k, v = (torch.randn(1, 128, 6, 32, dtype=torch.bfloat16) for _ in range(3))
    mask = BlockMask.from_layout(torch.rand(1, 6, 4, 4) < 0.6, 32, 128, 128)
    sinks = torch.tensor([-20.0, -1.5, 0.3, 2.0, 6.0, 25.0])
    check_attention(lambda q, k, v, sinks: block_sparse_attn_func(q, k, v, mask, causal=True, sinks=sinks), q, k, v,
                    sinks=sinks, attn_bias=mask.to_dense(), causal=True)


def test_compile_fullgraph():
    sq = sk = 64
    mask = BlockMask.from_layout(random_layout(1, 1, sq, sk, 32, 0.7) | torch.eye(2, dtype=torch.bool), 32, sq, sk)
    mask.kernel_lists()  # built (and cached) outside the compiled region
    q, k, v = qkv(1, sq, sk, 2, 2, 16)
    fn = torch.compile(lambda q, k, v: block_sparse_attn_func(q, k, v, mask), fullgraph=True, backend="eager")
    assert torch.allclose(fn(q, k, v), block_sparse_attn_func(q, k, v, mask))


@pytest.mark.parametrize("bad, error, name", [
    (dict(block_mask="nope"), TypeError, "block_mask"),
    (dict(block_mask=BlockMask.causal(65, 64, 32)), ValueError, "seqlen_q"),
    (dict(block_mask=BlockMask.from_layout(torch.ones(3, 2, 2, 2, dtype=torch.bool), 32)), ValueError, "block_mask"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
], ids=["not_a_mask", "wrong_seqlen", "wrong_batch", "dropout"])
def test_bad_input(bad, error, name):
    q, k, v = qkv(2, 64, 64, 2, 2, 16)
    args = dict(block_mask=BlockMask.causal(64, 64, 32)) | bad
    with pytest.raises(error, match=name):
        block_sparse_attn_func(q, k, v, **args)


@pytest.mark.parametrize("call, error, name", [
    (lambda: BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), 48), ValueError, "block_size"),
    (lambda: BlockMask.from_layout(torch.ones(2, 2), 32), ValueError, "layout"),
    (lambda: BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool), 32, 100, 64), ValueError, "seqlen_q"),
    (lambda: create_block_mask("x", None, None, 64, 64), TypeError, "mask_mod"),
    (lambda: create_block_mask(lambda b, h, i, j: i + j, None, None, 64, 64, 32), TypeError, "bool"),
    (lambda: BlockMask.causal(64, 64, 32) & BlockMask.causal(64, 64, 16), ValueError, "block_size"),
    (lambda: BlockMask.from_layout(torch.ones(2, 3, 2, 2, dtype=torch.bool), 32)
     | BlockMask.from_layout(torch.ones(1, 2, 2, 2, dtype=torch.bool), 32), ValueError, "heads"),
    (lambda: create_block_mask(lambda b, h, i, j: torch.ones(3, 3, dtype=torch.bool), 2, None, 64, 64, 32),
     ValueError, "mask_mod"),
], ids=["block_size", "layout_dtype", "layout_extent", "mask_mod", "mask_mod_result", "combine", "combine_heads",
        "mask_mod_shape"])
def test_bad_mask_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# --- GPU ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("block", [128, 64], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_random_layout_gpu(dtype, head_dim, block, causal):
    sq, sk = (1000, 3001) if causal else (2048, 2048)
    mask = BlockMask.from_layout(random_layout(2, 4, sq, sk, block, 0.3, "cuda"), block, sq, sk)
    q, k, v = qkv(2, sq, sk, 4, 2, head_dim, dtype, "cuda")
    check_sparse(mask, q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_predicate_gpu(dtype):
    sq = sk = 1500
    mask = create_block_mask(lambda b, h, i, j: ((i // 100) == (j // 100)) | ((j % 256) < 16 + h), 1, 4, sq, sk,
                             128, device="cuda")
    q, k, v = qkv(1, sq, sk, 4, 4, 128, dtype, "cuda")
    check_sparse(mask, q, k, v, causal=True)


@pytest.mark.gpu
def test_dense_equivalence_and_determinism_gpu():
    sq = sk = 4096
    mask = BlockMask.from_layout(torch.ones(32, 32, dtype=torch.bool, device="cuda"), 128, sq, sk)
    q, k, v = (t.requires_grad_() for t in qkv(2, sq, sk, 8, 8, 128, torch.bfloat16, "cuda"))
    out = block_sparse_attn_func(q, k, v, mask, causal=True)
    dense = flashtile.flash_attn_func(q, k, v, causal=True)
    assert (out.float() - dense.float()).abs().max() < 2e-2
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["local_global", "strided", "fixed", "bigbird", "document"])
def test_patterns_gpu(pattern):
    seqlen, block = 3000, 128
    builders = {
        "local_global": lambda: flashtile.local_global_block_mask(seqlen, 200, 64, block_size=block, device="cuda",
                                                                  causal=True),
        "strided": lambda: flashtile.strided_block_mask(seqlen, 300, block_size=block, device="cuda", causal=True),
        "fixed": lambda: flashtile.fixed_block_mask(seqlen, 256, 32, block_size=block, device="cuda"),
        "bigbird": lambda: flashtile.bigbird_block_mask(seqlen, 2, 1, 1, heads=4, block_size=block, device="cuda"),
        "document": lambda: flashtile.document_block_mask(
            flashtile.document_ids_from_lengths([700, 1, 999, 1300], device="cuda"), block_size=block,
            device="cuda", causal=True),
    }
    mask = builders[pattern]()
    assert mask.density() < 1
    q, k, v = qkv(1, seqlen, seqlen, 4, 2, 64, torch.bfloat16, "cuda")
    check_sparse(mask, q, k, v)
