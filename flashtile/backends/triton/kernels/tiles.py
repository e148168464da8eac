"""Score and mask logic shared by every attention kernel.

Every kernel visits (query-block, key-block) tiles. A tile is *full* when no
element of it is masked by position (sequence bounds, causal, sliding
window), and *partial* otherwise. Kernels run up to three loops, partial /
full / partial, so the positional mask is paid only where it is needed; tiles
outside the band are never visited. The helpers below decide those ranges
for one query block (or one key block) and build the scores of one tile.

Positions are expressed with one integer, ``diag``: query row ``i`` is
aligned with key ``i + diag``. flash_attn aligns to the bottom-right corner
(``diag = seqlen_k - seqlen_q``), PyTorch's SDPA to the top-left (``diag =
0``). Query ``i`` sees key ``j`` iff ``i + diag - window_left <= j <= i +
diag + window_right``; causal is ``window_right = 0``; MASK_LEFT / MASK_RIGHT
say whether each bound exists.

Tile helpers take ``rows`` and ``cols`` as broadcastable 2-D index tensors
(``[M, 1]`` and ``[1, N]``, or transposed for kernels that hold transposed
tiles), so one function serves every orientation.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# kinds of SDPA attn_mask / additive bias
BIAS_NONE = tl.constexpr(0)
BIAS_ADD = tl.constexpr(1)
BIAS_BOOL = tl.constexpr(2)


@triton.jit
def program_tile(seqlen, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr, tail_bh=0):
    """Map the 1-D program id to (block index along the sequence, batch*head index).

    The grid is flat (no 65535 limit on batch*heads) with sequence blocks
    varying fastest, so programs running together share K/V in L2. When the
    last blocks carry the most work (causal forward and dQ), they are issued
    first. With work that varies by block (causal), the last ``tail_bh``
    (batch, head) pairs are issued block by block instead, heads varying
    fastest: the grid then ends on the lightest blocks of all of them
    rather than on one head's heaviest block running alone (longest first).
    """
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(seqlen, BLOCK)
    # programs before the tail section
    head_major = (tl.num_programs(0) // num_blocks - tail_bh) * num_blocks
    if pid < head_major:
        pid_bh = pid // num_blocks
        pid_blk = pid % num_blocks
    else:
        tail = tl.maximum(tail_bh, 1)
        pid_bh = head_major // num_blocks + (pid - head_major) % tail
        pid_blk = (pid - head_major) // tail
    if HEAVY_LAST:
        pid_blk = num_blocks - 1 - pid_blk
    return pid_blk, pid_bh


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def row_source(base, offs_rows, offs_d, stride, seqlen, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr, USE_DESC: tl.constexpr):
    """Where tiles of rows of the ``[seqlen, HEAD_DIM]`` matrix at ``base`` are read
    from: a tensor descriptor (bulk copies, zero fill past the bounds) or a
    block of pointers at row 0 (``offs_rows = arange(BLOCK_ROWS)``). See ``load_rows``."""
    if USE_DESC:
        return tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[stride, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base + offs_rows[:, None] * stride + offs_d[None, :]


@triton.jit
def load_rows(src, start, stride, rows, seqlen, d_ok, USE_DESC: tl.constexpr):
    """The tile of rows ``start + arange(BLOCK_ROWS)`` (= ``rows``) from a ``row_source``."""
    if USE_DESC:
        return src.load([start, 0])
    else:
        return tl.load(src + start * stride, mask=(rows[:, None] < seqlen) & d_ok, other=0.0)


@triton.jit
def key_ranges(start_m, seqlen_k, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """For the query block starting at ``start_m``, keys ``[lo, hi)`` are visited:
    tiles in ``[lo, full_lo)`` and ``[full_hi, hi)`` are partial, tiles in
    ``[full_lo, full_hi)`` full. ``lo <= full_lo <= full_hi <= hi``; all but
    ``hi`` (which may be seqlen_k) are multiples of BLOCK_N."""
    if MASK_RIGHT:
        # last key seen by the last row of the block, and by its first row
        hi = tl.maximum(tl.minimum(seqlen_k, start_m + BLOCK_M + diag + window_right), 0)
        full_hi = tl.maximum(tl.minimum(seqlen_k, start_m + diag + window_right + 1), 0) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if MASK_LEFT:
        # first key seen by the first row of the block, and by its last row
        lo = tl.minimum(tl.maximum(start_m + diag - window_left, 0), hi) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diag - window_left, 0), BLOCK_N) * BLOCK_N
        full_lo = _clamp(full_lo, lo, hi)
        full_hi = _clamp(full_hi, full_lo, hi)
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo, full_hi, hi


@triton.jit
def query_ranges(start_n, seqlen_q, diag, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """For the key block starting at ``start_n``, query rows ``[lo, hi)`` are
    visited: tiles in ``[lo, full_lo)`` and ``[full_hi, hi)`` are partial,
    ``[full_lo, full_hi)`` full. Bounds are multiples of BLOCK_M except ``hi``.
    Rows past seqlen_q need no mask in the backward pass: their dO and delta
    load as zero."""
    q_end = tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M
    if MASK_LEFT:
        # one past the last row that sees any key of the block / all of them
        hi = tl.maximum(tl.minimum(seqlen_q, start_n + BLOCK_N - diag + window_left), 0)
        full_hi = tl.maximum(tl.minimum(seqlen_q, start_n - diag + window_left + 1), 0) // BLOCK_M * BLOCK_M
    else:
        hi = seqlen_q
        full_hi = q_end
    if MASK_RIGHT:
        # first row that sees any key of the block / all keys of the block
        lo = tl.minimum(tl.maximum(start_n - diag - window_right, 0), hi) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - window_right, 0), BLOCK_M) * BLOCK_M
        full_lo = _clamp(full_lo, lo, tl.maximum(hi, full_hi))
    else:
        lo = 0
        full_lo = 0
    full_hi = _clamp(full_hi, full_lo, tl.maximum(hi, full_hi))
    return lo, full_lo, full_hi, hi


@triton.jit
def tile_mask(rows, cols, seqlen_k, diag, window_left, window_right,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Boolean mask of the (query, key) pairs allowed by position."""
    mask = cols < seqlen_k
    if MASK_RIGHT:
        mask = mask & (cols <= rows + diag + window_right)
    if MASK_LEFT:
        mask = mask & (cols >= rows + diag - window_left)
    return mask


@triton.jit
def tile_scores(qk, rows, cols, seqlen_q, seqlen_k, diag, qk_scale, softcap_in, softcap_out, alibi_slope,
                bias_base, stride_bm, stride_bn,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr):
    """Scores of one tile in log2 units from the raw products ``qk = q . k``.

    ``s = softcap * tanh(qk * scale / softcap)`` (or ``qk * scale``), then
    ``- slope * |i + diag - j|`` (ALiBi), then ``+ bias`` or a boolean mask
    (False -> -inf). Also returns ``tanh(...)`` (for the softcap gradient; 0
    without softcap). ``softcap_in = scale / softcap``, ``softcap_out =
    softcap * log2(e)``. A bias without a query-row dimension (key padding)
    is read as one vector per tile.
    """
    if SOFTCAP:
        # tanh(x) = 2 sigmoid(2x) - 1, finite for every x
        t = 2.0 * tl.sigmoid(2.0 * softcap_in * qk) - 1.0
        s = t * softcap_out
    else:
        t = qk * 0.0
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - (alibi_slope * LOG2E) * tl.abs(rows + diag - cols).to(tl.float32)
    if BIAS_KIND != BIAS_NONE:
        if BIAS_ROWS:
            ok = (rows < seqlen_q) & (cols < seqlen_k)
            bias = tl.load(bias_base + rows.to(tl.int64) * stride_bm + cols * stride_bn, mask=ok, other=0)
        else:
            bias = tl.load(bias_base + cols * stride_bn, mask=cols < seqlen_k, other=0)
        if BIAS_KIND == BIAS_ADD:
            s = s + bias.to(tl.float32) * LOG2E
        else:
            s = tl.where(bias != 0, s, float("-inf"))
    return s, t


@triton.jit
def masked_pv(acc, p, v, allowed, DOT_PRECISION: tl.constexpr):
    """``acc + P V`` for a tile with masked positions (``allowed`` False), where a key a row
    does not see must add nothing to it, NaN and Inf in its value included (``0 * NaN``
    is NaN): the product runs on V with non-finite values zeroed, and the output
    elements whose sum takes a non-finite value the row sees become NaN (as in
    ``softmax(S) V``, up to Inf then reading NaN)."""
    bad = (v != v) | (tl.abs(v) == float("inf"))
    acc = tl.dot(p.to(v.dtype), tl.where(bad, 0.0, v), acc, input_precision=DOT_PRECISION)
    seen_bad = tl.dot(allowed.to(v.dtype), bad.to(v.dtype), input_precision=DOT_PRECISION)
    return tl.where(seen_bad > 0, float("nan"), acc)


@triton.jit
def dropout_keep(seed, bh, rows, cols, rows_per_head, cols_per_row, dropout_p):
    """Keep-mask of dropout for elements (bh, rows, cols): Philox (Triton's
    ``tl.rand``) on the element's linear index, so the backward pass and
    ``flashtile.testing.dropout_keep_mask`` regenerate the same mask."""
    offsets = (bh.to(tl.int64) * rows_per_head + rows) * cols_per_row + cols
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def sparse_entry(tile_list, entry, ok, PAIRS: tl.constexpr):
    """Entry ``entry`` of a block-sparse tile list (see
    ``flashtile.masks.block_mask.KernelLists``): (block, pattern id), the
    entries being (block, pattern id) pairs when PAIRS, else blocks alone
    (pattern id 0). ``ok`` False gives (0, 0) without reading."""
    if PAIRS:
        blk = tl.load(tile_list + 2 * entry, mask=ok, other=0)
        pattern = tl.load(tile_list + 2 * entry + 1, mask=ok, other=0)
    else:
        blk = tl.load(tile_list + entry, mask=ok, other=0)
        pattern = blk * 0
    return blk, pattern


@triton.jit
def sparse_step(tile_list, it, end, blk, SUB: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                PAIRS: tl.constexpr):
    """Block-sparse iteration over kernel tiles ``it`` in [.., end): each list entry is a
    mask block of MASK_BLOCK rows, cut into SUB = MASK_BLOCK / BLOCK kernel tiles.
    Given ``blk``, the block of tile ``it`` (read one step ahead, so that its
    load is not on the path of this step's K/V loads), returns (first row of
    the tile, first row of its mask block) and the entry of tile ``it + 1``."""
    blk_start = blk * MASK_BLOCK
    nxt_blk, nxt_pattern = sparse_entry(tile_list, tl.minimum(it + 1, end - 1) // SUB, True, PAIRS)
    return blk_start + (it % SUB) * BLOCK, blk_start, nxt_blk, nxt_pattern


@triton.jit
def sparse_tile(tile_list, it, SUB: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                PAIRS: tl.constexpr):
    """Kernel tile ``it`` of a block-sparse loop over a tile list (see
    ``flashtile.masks.block_mask.KernelLists``): each list entry is a mask block
    of MASK_BLOCK rows, cut into SUB = MASK_BLOCK / BLOCK kernel tiles; the
    entries are (block, pattern id) pairs when PAIRS, else blocks alone.
    Returns (first row of the tile, first row of its mask block, pattern id).

    The entry is read as a 2-vector, not a scalar: the software pipeliner
    then issues it as an asynchronous copy some tiles ahead (the loop gets
    extra stages for it, ``SPARSE_STAGES``), so the K/V loads that depend on
    it are not held up by a load at each step. Used by the forward kernel; in
    the backward kernels, where the extra stages do not fit, the scalar read
    one tile ahead (``sparse_step``) measured faster."""
    two = tl.arange(0, 2)
    entry = it // SUB
    if PAIRS:
        pair = tl.load(tile_list + 2 * entry + two)
        pattern = tl.sum(tl.where(two == 1, pair, 0), 0)
    else:
        pair = tl.load(tile_list + entry + two, mask=two == 0, other=0)
        pattern = 0
    blk_start = tl.sum(tl.where(two == 0, pair, 0), 0) * MASK_BLOCK
    return blk_start + (it % SUB) * BLOCK, blk_start, pattern


@triton.jit
def pattern_mask(PatternBits, pattern, rows, cols, row0, col0, col_start, MASK_M: tl.constexpr,
                 MASK_N: tl.constexpr, TILE_N: tl.constexpr):
    """Element mask of a partial block-sparse tile at the (query, key) positions
    ``rows``, ``cols`` (broadcastable index tensors, either orientation): the
    tile's pattern ``pattern`` of the mask tile that starts at (``row0``,
    ``col0``). Patterns are bit-packed, int32 ``[MASK_M, WORDS]`` each (bit
    ``b`` of word ``w`` is key ``32 w + b``), so a row's bits load as a few
    row vectors instead of a [rows, keys] gather. This kernel tile covers the
    TILE_N keys from ``col_start``."""
    WORDS: tl.constexpr = (MASK_N + 31) // 32
    TILE_WORDS: tl.constexpr = (TILE_N + 31) // 32
    rel = cols - col0
    row_words = PatternBits + pattern.to(tl.int64) * (MASK_M * WORDS) + (rows - row0) * WORDS
    first = (col_start - col0) // 32
    bits = tl.load(row_words + first)
    for w in tl.static_range(1, TILE_WORDS):
        bits = tl.where(rel // 32 == first + w, tl.load(row_words + first + w), bits)
    return ((bits >> (rel % 32)) & 1) != 0
