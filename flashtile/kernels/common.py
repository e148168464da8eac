"""Score and mask logic shared by every attention kernel.

Every kernel visits (query-block, key-block) tiles. A tile is *full* when no
element of it is masked, and *partial* otherwise. Kernels run two loops, an
unmasked one over full tiles and a masked one over partial tiles, so the mask
arithmetic is paid only where it is needed. The helpers below decide, for one
query block or one key block, which key (or query) ranges are full, partial
or skipped, and build the element mask of a partial tile.

Causal masking is expressed with one integer, ``causal_offset``: query row
``i`` sees key ``j`` iff ``j <= i + causal_offset``. flash_attn aligns the mask
to the bottom-right corner (``causal_offset = seqlen_k - seqlen_q``); PyTorch's
SDPA aligns it to the top-left (``causal_offset = 0``).
"""

import triton
import triton.language as tl


@triton.jit
def program_tile(seqlen, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """Map the 1-D program id to (block index along the sequence, batch*head index).

    The grid is flat (no 65535 limit on batch*heads) with sequence blocks
    varying fastest, so programs running together share K/V in L2. When the
    last blocks carry the most work (causal forward), they are issued first.
    """
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(seqlen, BLOCK)
    pid_bh = pid // num_blocks
    pid_blk = pid % num_blocks
    if HEAVY_LAST:
        pid_blk = num_blocks - 1 - pid_blk
    return pid_blk, pid_bh


@triton.jit
def key_ranges(start_m, seqlen_k, causal_offset,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query block starting at ``start_m``: key tiles in ``[0, full_end)``
    are full, tiles in ``[full_end, end)`` are partial, the rest are skipped.
    Both bounds are multiples of BLOCK_N except ``end`` which may be seqlen_k."""
    if IS_CAUSAL:
        # last key seen by the last row of the block, and by its first row
        end = tl.minimum(seqlen_k, start_m + BLOCK_M + causal_offset)
        end = tl.maximum(end, 0)
        full_end = tl.minimum(seqlen_k, start_m + causal_offset + 1)
        full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    else:
        end = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def query_ranges(start_n, seqlen_q, causal_offset,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the key block starting at ``start_n``: query tiles in ``[begin, full_begin)``
    are partial, tiles in ``[full_begin, seqlen_q)`` are full. ``begin`` and
    ``full_begin`` are multiples of BLOCK_M. Rows past seqlen_q need no score
    mask in the backward pass: their dO and delta load as zero."""
    if IS_CAUSAL:
        # first query row that sees any key of the block / all keys of the block
        begin = tl.maximum(start_n - causal_offset, 0)
        begin = tl.minimum(begin, seqlen_q) // BLOCK_M * BLOCK_M
        full_begin = tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0)
        full_begin = tl.minimum(tl.cdiv(full_begin, BLOCK_M) * BLOCK_M, tl.cdiv(seqlen_q, BLOCK_M) * BLOCK_M)
    else:
        begin = 0
        full_begin = 0
    return begin, full_begin


@triton.jit
def tile_mask(offs_m, offs_n, seqlen_k, causal_offset, IS_CAUSAL: tl.constexpr):
    """Boolean [BLOCK_M, BLOCK_N] mask of the (query, key) pairs that are attended."""
    mask = offs_n[None, :] < seqlen_k
    if IS_CAUSAL:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return mask
