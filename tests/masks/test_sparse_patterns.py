"""The ready-made block-sparse patterns (flashtile.masks.patterns).

Every mask is checked element by element against the pattern's rule written
out independently here (plain Python over (i, j), or block layouts built by
hand for BigBird), its tile kinds against its elements, and once end to end:
block_sparse_attn_func on the tiled CPU path against attention_ref with the
dense mask.
"""

import functools

import pytest
import torch

import flashtile
import flashtile.testing
from flashtile import create_block_mask
from flashtile.masks.block_mask import EMPTY, FULL
from flashtile.masks.patterns import (
    and_masks,
    bigbird_block_mask,
    document_block_mask,
    document_ids_from_lengths,
    document_mask_mod,
    fixed_block_mask,
    fixed_mask_mod,
    local_global_block_mask,
    local_global_mask_mod,
    or_masks,
    strided_block_mask,
    strided_mask_mod,
)

# (seqlen, block size): ends inside a block or not, few and many blocks
SIZES = [(100, 16), (203, 32), (256, 64), (203, 64), (256, 16)]


# --- independent references ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def python_dense(seqlen_q: int, seqlen_k: int, rule: str, *args) -> torch.Tensor:
    """The element mask of a rule, one (i, j) at a time in plain Python ints."""
    fn = RULES[rule]
    return torch.tensor([[bool(fn(i, j, *args)) for j in range(seqlen_k)] for i in range(seqlen_q)],
                        dtype=torch.bool).reshape(seqlen_q, seqlen_k)


def _local_global(i, j, window, global_set):
    return abs(i - j) <= window or i in global_set or j in global_set


def _strided(i, j, stride):
    # (i - j) a multiple of stride, written without relying on % of negatives
    return abs(i - j) < stride or abs(i - j) // stride * stride == abs(i - j)


def _fixed(i, j, block_len, num_summary):
    return int(i / block_len) == int(j / block_len) or j - int(j / block_len) * block_len >= block_len - num_summary


def _causal(i, j, offset):
    return j <= i + offset


RULES = {"local_global": _local_global, "strided": _strided, "fixed": _fixed, "causal": _causal}


def with_causal(expected: torch.Tensor, causal: bool) -> torch.Tensor:
    """``expected`` (..., sq, sk) restricted to j <= i + sk - sq (bottom-right) if causal."""
    if not causal:
        return expected
    sq, sk = expected.shape[-2:]
    return expected & python_dense(sq, sk, "causal", sk - sq)


def check_mask(mask, expected: torch.Tensor) -> None:
    """``mask`` is exactly ``expected`` (bool, (sq, sk) or (B, H, sq, sk)), and its tile
    kinds follow the elements: FULL iff every pair of the tile's real rows is allowed
    and the tile lies inside the keys, EMPTY iff no pair is."""
    expected = expected.reshape((1,) * (4 - expected.dim()) + tuple(expected.shape))
    B, H, sq, sk = expected.shape
    bq, bk = mask.block_size
    nq, nk = -(-sq // bq), -(-sk // bk)
    assert (mask.seqlen_q, mask.seqlen_k) == (sq, sk)
    assert mask.shape == (B, H, nq, nk)
    assert torch.equal(mask.to_dense(), expected)
    allowed = torch.zeros(B, H, nq * bq, nk * bk, dtype=torch.bool)
    allowed[..., :sq, :sk] = expected
    past_rows = (torch.arange(nq * bq) >= sq)[:, None]  # rows past seqlen_q do not count
    full = (allowed | past_rows).reshape(B, H, nq, bq, nk, bk).all(5).all(3)
    full &= (torch.arange(nk) + 1) * bk <= sk
    some = allowed.reshape(B, H, nq, bq, nk, bk).any(5).any(3)
    assert torch.equal(mask.tiles == FULL, full)
    assert torch.equal(mask.tiles == EMPTY, ~some)


def attention_matches(mask, batch=1, heads=2, head_dim=16):
    """block_sparse_attn_func under ``mask`` equals attention_ref with its dense mask (forward)."""
    q = torch.randn(batch, mask.seqlen_q, heads, head_dim)
    k = torch.randn(batch, mask.seqlen_k, heads, head_dim)
    v = torch.randn(batch, mask.seqlen_k, heads, head_dim)
    out = flashtile.block_sparse_attn_func(q, k, v, mask)
    ref = flashtile.testing.attention_ref(q, k, v, attn_bias=mask.to_dense())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture
def tiled_path(monkeypatch):
    """CPU tensors take the tiled PyTorch path when Triton's interpreter is off."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# --- Longformer: local + global ---------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen, block", SIZES, ids=str)
@pytest.mark.parametrize("window, globals_", [(5, 0), (17, 3), (0, (7, 61, 99))], ids=["w5", "w17-g3", "w0-pos"])
def test_local_global(seqlen, block, causal, window, globals_):
    global_set = frozenset(range(globals_)) if isinstance(globals_, int) else frozenset(globals_)
    mask = local_global_block_mask(seqlen, window, list(globals_) if isinstance(globals_, tuple) else globals_,
                                   block_size=block, causal=causal)
    check_mask(mask, with_causal(python_dense(seqlen, seqlen, "local_global", window, global_set), causal))


def test_local_global_token_forms():
    # a count, positions (list or tensor, any order, repeats) and a bool mask say the same thing
    seqlen, block = 150, 16
    by_count = local_global_block_mask(seqlen, 4, 3, block_size=block)
    for same in ([0, 1, 2], torch.tensor([2, 0, 1, 1]), torch.arange(seqlen) < 3, torch.tensor(3)):
        assert torch.equal(local_global_block_mask(seqlen, 4, same, block_size=block).to_dense(), by_count.to_dense())
    # no global token: a band
    band = local_global_block_mask(seqlen, 4, [], block_size=block)
    check_mask(band, python_dense(seqlen, seqlen, "local_global", 4, frozenset()))
    # more global tokens than the sequence: everything
    assert bool(local_global_block_mask(seqlen, 0, 1000, block_size=block).to_dense().all())


# --- Sparse Transformer: strided and fixed --------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen, block", SIZES, ids=str)
@pytest.mark.parametrize("stride", [1, 7, 16, 40])
def test_strided(seqlen, block, causal, stride):
    mask = strided_block_mask(seqlen, stride, block_size=block, causal=causal)
    check_mask(mask, with_causal(python_dense(seqlen, seqlen, "strided", stride), causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen, block", SIZES, ids=str)
@pytest.mark.parametrize("block_len, num_summary", [(8, 1), (20, 3), (64, 0), (50, 50)])
def test_fixed(seqlen, block, causal, block_len, num_summary):
    mask = fixed_block_mask(seqlen, block_len, num_summary, block_size=block, causal=causal)
    check_mask(mask, with_causal(python_dense(seqlen, seqlen, "fixed", block_len, num_summary), causal))


def test_rectangular_blocks():
    # a (block_q, block_k) pair works for the element-level patterns
    mask = strided_block_mask(203, 12, block_size=(32, 16), causal=True)
    check_mask(mask, with_causal(python_dense(203, 203, "strided", 12), True))


# --- BigBird ----------------------------------------------------------------------------

def bigbird_fixed_layout(n, window, n_global):
    """Window and global blocks, by hand."""
    layout = torch.zeros(n, n, dtype=torch.bool)
    for p in range(n):
        for r in range(n):
            layout[p, r] = abs(p - r) <= window or p < n_global or r < n_global
    return layout


def expand_layout(layout, block, seqlen):
    """Block layout (..., n, n) -> element mask (..., seqlen, seqlen)."""
    dense = layout.repeat_interleave(block, -2).repeat_interleave(block, -1)
    return dense[..., :seqlen, :seqlen]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen, block", SIZES, ids=str)
@pytest.mark.parametrize("num_random, window, n_global", [(2, 1, 1), (1, 0, 0), (3, 2, 2), (0, 1, 1)])
def test_bigbird(seqlen, block, causal, num_random, window, n_global):
    n = -(-seqlen // block)
    mask = bigbird_block_mask(seqlen, num_random, window, n_global, seed=3, block_size=block, causal=causal)
    fixed = bigbird_fixed_layout(n, window, n_global)
    # the blocks the mask sees: the fixed ones plus the random draws, which we read back
    seen = (mask.tiles != EMPTY)[0, 0]
    drawn = seen & ~fixed
    past = torch.ones(n, n, dtype=torch.bool).tril()
    if causal:
        assert not bool((drawn & ~past).any()), "random blocks drawn after the diagonal"
        assert torch.equal(seen & fixed, fixed & past)
    else:
        assert torch.equal(seen & fixed, fixed)
    # every query block draws min(num_random, what is left) blocks
    left = (~fixed & past if causal else ~fixed).sum(1)
    assert torch.equal(drawn.sum(1), left.clamp(max=num_random))
    # elements: every pair of a seen block (and causal on top)
    check_mask(mask, with_causal(expand_layout(seen, block, seqlen), causal))


def test_bigbird_seed_batch_heads():
    seqlen, block = 256, 16
    a = bigbird_block_mask(seqlen, 3, seed=5, batch=2, heads=3, block_size=block)
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a.tiles, bigbird_block_mask(seqlen, 3, seed=5, batch=2, heads=3, block_size=block).tiles)
    assert not torch.equal(a.tiles, bigbird_block_mask(seqlen, 3, seed=6, batch=2, heads=3, block_size=block).tiles)
    # independent draws per (batch, head)
    flat = a.tiles.reshape(6, -1)
    assert len({tuple(row.tolist()) for row in flat}) == 6
    assert bigbird_block_mask(seqlen, 3, batch=2, block_size=block).shape == (2, 1, 16, 16)
    assert bigbird_block_mask(seqlen, 3, heads=4, block_size=block).shape == (1, 4, 16, 16)
    # the dense view per (batch, head) is its layout expanded
    check_mask(a, expand_layout(a.tiles != EMPTY, block, seqlen))


# --- documents -------------------------------------------------------------------------

def random_lengths(total, n_docs):
    cuts = sorted(torch.randint(0, total + 1, (n_docs - 1,)).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def python_doc_ids(lengths):
    return [d for d, n in enumerate(lengths) for _ in range(n)]


def python_doc_dense(ids_q, ids_k):
    return torch.tensor([[a == b for b in ids_k] for a in ids_q], dtype=torch.bool).reshape(len(ids_q), len(ids_k))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen, block", SIZES, ids=str)
def test_document(seqlen, block, causal):
    torch.manual_seed(seqlen * 1000 + block)
    lengths = random_lengths(seqlen, 5)
    ids = python_doc_ids(lengths)
    assert document_ids_from_lengths(lengths).tolist() == ids
    mask = document_block_mask(torch.tensor(ids), block_size=block, causal=causal)
    expected = with_causal(python_doc_dense(ids, ids), causal)
    check_mask(mask, expected)
    if causal:
        # packed documents: causal within each document
        start = torch.tensor([sum(lengths[:d]) for d in ids])
        i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
        assert torch.equal(mask.to_dense()[0, 0], (j <= i) & (j >= start[:, None]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_document_batched_and_cross(causal):
    torch.manual_seed(7)
    sq, sk, block = 100, 203, 32
    lengths_q = [random_lengths(sq, 4) for _ in range(3)]
    lengths_k = [random_lengths(sk, 4) for _ in range(3)]
    ids_q = [python_doc_ids(lq) for lq in lengths_q]
    ids_k = [python_doc_ids(lk) for lk in lengths_k]
    doc_q = document_ids_from_lengths(torch.tensor(lengths_q))
    doc_k = document_ids_from_lengths(lengths_k)
    assert doc_q.tolist() == ids_q and doc_k.tolist() == ids_k
    mask = document_block_mask(doc_q, doc_k, block_size=block, causal=causal)
    expected = torch.stack([python_doc_dense(a, b) for a, b in zip(ids_q, ids_k)])[:, None]
    check_mask(mask, with_causal(expected, causal))
    # 1-D keys shared by every batch row; ids need not be contiguous nor sorted
    shared = torch.randint(0, 3, (sk,))
    mask = document_block_mask(doc_q.to(torch.int32), shared, block_size=block, causal=causal)
    expected = torch.stack([python_doc_dense(a, shared.tolist()) for a in ids_q])[:, None]
    check_mask(mask, with_causal(expected, causal))


def test_document_ids_from_lengths():
    assert document_ids_from_lengths([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    assert document_ids_from_lengths([[1, 2, 0], [0, 0, 3]]).tolist() == [[0, 1, 1], [2, 2, 2]]
    assert document_ids_from_lengths([]).shape == (0,)
    assert document_ids_from_lengths(torch.tensor([3], dtype=torch.int16)).dtype == torch.int64


# --- predicates and their combinations ---------------------------------------------------

def test_mask_mods_with_create_block_mask():
    torch.manual_seed(11)
    seqlen, block = 203, 32
    i, j = torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :]
    causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx  # noqa: E731
    # and: the strided pattern made causal by a predicate equals the builder's causal=True
    both = create_block_mask(and_masks(strided_mask_mod(9), causal), None, None, seqlen, seqlen, block)
    assert torch.equal(both.tiles, strided_block_mask(seqlen, 9, block_size=block, causal=True).tiles)
    assert torch.equal(both.to_dense()[0, 0], python_dense(seqlen, seqlen, "strided", 9) & (j <= i))
    # or: a window or a fixed pattern
    either = create_block_mask(or_masks(local_global_mask_mod(3), fixed_mask_mod(40, 2)), None, None, seqlen, seqlen,
                               block)
    expected = python_dense(seqlen, seqlen, "local_global", 3, frozenset()) | python_dense(seqlen, seqlen, "fixed",
                                                                                            40, 2)
    check_mask(either, expected)
    # no predicate: everything (and) or nothing (or)
    assert bool(create_block_mask(and_masks(), None, None, 50, 50, 16).to_dense().all())
    assert not bool(create_block_mask(or_masks(), None, None, 50, 50, 16).to_dense().any())
    # a per-head predicate combined with documents (2-D ids need B)
    ids = torch.randint(0, 4, (2, seqlen)).sort(-1).values
    per_head = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 10 * (h + 1)  # noqa: E731
    mask = create_block_mask(and_masks(document_mask_mod(ids), per_head), 2, 3, seqlen, seqlen, block)
    same_doc = ids[:, None, :, None] == ids[:, None, None, :]
    near = (i - j).abs()[None, None] <= 10 * (torch.arange(3)[None, :, None, None] + 1)
    check_mask(mask, same_doc & near)


def test_chunked_evaluation(monkeypatch):
    # the patterns go through create_block_mask's chunks; small chunks give the same mask
    import flashtile.masks.block_mask as bm

    seqlen, block = 256, 16
    whole = local_global_block_mask(seqlen, 7, [3, 200], block_size=block)
    monkeypatch.setattr(bm, "_CHUNK_ELEMENTS", 4096)
    chunked = local_global_block_mask(seqlen, 7, [3, 200], block_size=block)
    assert torch.equal(whole.to_dense(), chunked.to_dense())
    assert torch.equal(whole.tiles != EMPTY, chunked.tiles != EMPTY)


def test_sparse_cases_skip_tiles():
    seqlen, block = 256, 16
    ids = document_ids_from_lengths([64, 100, 92])
    masks = {
        "local_global": local_global_block_mask(seqlen, 8, 2, block_size=block),
        "strided": strided_block_mask(seqlen, 64, block_size=block),
        "fixed": fixed_block_mask(seqlen, 64, 1, block_size=block),
        "bigbird": bigbird_block_mask(seqlen, 2, block_size=block),
        "document": document_block_mask(ids, block_size=block),
    }
    for name, mask in masks.items():
        assert 0 < mask.density() < 0.75, name
        assert mask.density() > (mask & flashtile.BlockMask.causal(seqlen, seqlen, block)).density(), name


# --- bad arguments ---------------------------------------------------------------------

IDS = torch.zeros(10, dtype=torch.int64)

BAD = [
    (local_global_block_mask, (-1, 4), {}, ValueError, "seqlen"),
    (local_global_block_mask, (10.0, 4), {}, TypeError, "seqlen"),
    (local_global_block_mask, (10, -1), {}, ValueError, "window"),
    (local_global_block_mask, (10, 2, [0, 10]), {}, ValueError, "global_tokens"),
    (local_global_block_mask, (10, 2, [-1]), {}, ValueError, "global_tokens"),
    (local_global_block_mask, (10, 2, [1.5]), {}, TypeError, "global_tokens"),
    (local_global_block_mask, (10, 2, True), {}, TypeError, "global_tokens"),
    (local_global_block_mask, (10, 2, torch.ones(9, dtype=torch.bool)), {}, ValueError, "global_tokens"),
    (local_global_block_mask, (10, 2, [[1, 2]]), {}, ValueError, "global_tokens"),
    (local_global_block_mask, (10, 2), {"block_size": 24}, ValueError, "block_size"),
    (local_global_block_mask, (10, 2), {"causal": 1}, TypeError, "causal"),
    (local_global_mask_mod, (-2,), {}, ValueError, "window"),
    (strided_block_mask, (10, 0), {}, ValueError, "stride"),
    (strided_block_mask, (10, "4"), {}, TypeError, "stride"),
    (strided_block_mask, (10, 4), {"device": 3.5}, ValueError, "device"),
    (fixed_block_mask, (10, 0), {}, ValueError, "block_len"),
    (fixed_block_mask, (10, 4, -1), {}, ValueError, "num_summary"),
    (fixed_block_mask, (10, 4, 5), {}, ValueError, "num_summary"),
    (fixed_mask_mod, (4, 1.0), {}, TypeError, "num_summary"),
    (bigbird_block_mask, (100, -1), {}, ValueError, "num_random_blocks"),
    (bigbird_block_mask, (100, 1, -1), {}, ValueError, "window_blocks"),
    (bigbird_block_mask, (100, 1, 1, 1.0), {}, TypeError, "global_blocks"),
    (bigbird_block_mask, (100, 1), {"seed": -1}, ValueError, "seed"),
    (bigbird_block_mask, (100, 1), {"batch": 0}, ValueError, "batch"),
    (bigbird_block_mask, (100, 1), {"heads": 2.0}, TypeError, "heads"),
    (bigbird_block_mask, (100, 1), {"block_size": (16, 32)}, ValueError, "block_size"),
    (bigbird_block_mask, (100, 1), {"block_size": 20}, ValueError, "block_size"),
    (document_block_mask, ([0, 0, 1],), {}, TypeError, "document_ids"),
    (document_block_mask, (IDS.float(),), {}, TypeError, "document_ids"),
    (document_block_mask, (IDS.bool(),), {}, TypeError, "document_ids"),
    (document_block_mask, (IDS.reshape(1, 2, 5),), {}, ValueError, "document_ids"),
    (document_block_mask, (IDS, IDS.float()), {}, TypeError, "document_ids_k"),
    (document_block_mask, (IDS.reshape(2, 5), IDS[:9].reshape(3, 3)), {}, ValueError, "batch"),
    (document_block_mask, (IDS,), {"causal": "yes"}, TypeError, "causal"),
    (document_mask_mod, (IDS.reshape(1, 1, 10),), {}, ValueError, "document_ids"),
    (document_ids_from_lengths, ([3, -1],), {}, ValueError, "lengths"),
    (document_ids_from_lengths, ([1.5, 2],), {}, TypeError, "lengths"),
    (document_ids_from_lengths, ([[1, 2], [1, 1]],), {}, ValueError, "lengths"),
    (document_ids_from_lengths, (torch.ones(1, 1, 2, dtype=torch.int64),), {}, ValueError, "lengths"),
    (and_masks, (strided_mask_mod(2), 1), {}, TypeError, r"mask_mods\[1\]"),
    (or_masks, ("x",), {}, TypeError, r"mask_mods\[0\]"),
]


@pytest.mark.parametrize("fn, args, kwargs, exc, name", BAD, ids=[f"{b[0].__name__}-{b[4]}-{i}" for i, b in
                                                                  enumerate(BAD)])
def test_bad_arguments(fn, args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        fn(*args, **kwargs)


# --- end to end ---------------------------------------------------------------------

def _doc_mask(causal):
    return document_block_mask(document_ids_from_lengths([[30, 50, 37], [117, 0, 0]]), block_size=32, causal=causal)


BUILDERS = {
    "local_global": lambda causal: local_global_block_mask(117, 9, [0, 64], block_size=32, causal=causal),
    "strided": lambda causal: strided_block_mask(130, 40, block_size=16, causal=causal),
    "fixed": lambda causal: fixed_block_mask(100, 50, 1, block_size=16, causal=causal),
    "bigbird": lambda causal: bigbird_block_mask(128, 1, 0, 1, seed=1, heads=2, block_size=32, causal=causal),
    "document": _doc_mask,
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pattern", list(BUILDERS))
def test_attention_matches_reference(tiled_path, pattern, causal):
    torch.manual_seed(0)
    mask = BUILDERS[pattern](causal)
    assert mask.density() < 1
    attention_matches(mask, batch=2 if pattern == "document" else 1)
