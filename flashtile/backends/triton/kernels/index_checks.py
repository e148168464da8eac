"""Statistics of a decoding call's index tensors in one launch, for the host's
checks of their contents (flashtile/backends/triton/launch/index_stats.py): one small device-to-host
copy per call instead of a dozen reductions."""

import triton
import triton.language as tl

# the statistics, in the order the kernel writes them (int64)
STATS = ("seqlen_min", "length_max", "seqlen_max", "leftpad_min", "leftpad_over_max", "batch_idx_min",
         "batch_idx_max", "page_min", "page_max")


@triton.jit
def index_stats_kernel(CacheSeqlens, Leftpad, BatchIdx, BlockTable, Stats, batch, seqlen_new, stride_tb, max_pages,
                       HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid: (1,). Writes ``STATS`` to Stats, each a min or max over the batch and
    0 folded in (so an empty batch gives zeros and no statistic hides a bad value):
    ``length = CacheSeqlens + seqlen_new``, ``leftpad_over = Leftpad - length``,
    and (PAGE_SIZE > 0) the entries of BlockTable row ``b`` that sequence ``b``
    uses, its first ``cdiv(length, PAGE_SIZE)`` (at most ``max_pages``)."""
    zero = tl.zeros([BLOCK_B], dtype=tl.int64)
    seq_min, len_max, seq_max = zero, zero, zero
    pad_min, over_max, idx_min, idx_max = zero, zero, zero, zero
    for b0 in range(0, batch, BLOCK_B):
        offs = b0 + tl.arange(0, BLOCK_B)
        ok = offs < batch
        seq = tl.load(CacheSeqlens + offs, mask=ok, other=0).to(tl.int64)
        length = seq + seqlen_new
        seq_min = tl.minimum(seq_min, seq)
        seq_max = tl.maximum(seq_max, tl.where(ok, seq, 0))
        len_max = tl.maximum(len_max, tl.where(ok, length, 0))
        if HAS_LEFTPAD:
            pad = tl.load(Leftpad + offs, mask=ok, other=0).to(tl.int64)
            pad_min = tl.minimum(pad_min, pad)
            over_max = tl.maximum(over_max, tl.where(ok, pad - length, 0))
        if HAS_BATCH_IDX:
            idx = tl.load(BatchIdx + offs, mask=ok, other=0).to(tl.int64)
            idx_min = tl.minimum(idx_min, idx)
            idx_max = tl.maximum(idx_max, idx)
    page_min = tl.zeros([BLOCK_P], dtype=tl.int64)
    page_max = tl.zeros([BLOCK_P], dtype=tl.int64)
    if PAGE_SIZE > 0:
        for b in range(0, batch):
            length = tl.load(CacheSeqlens + b).to(tl.int64) + seqlen_new
            pages = tl.minimum(tl.maximum((length + PAGE_SIZE - 1) // PAGE_SIZE, 0), max_pages)
            for p0 in range(0, pages, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                entry = tl.load(BlockTable + b * stride_tb + offs_p, mask=offs_p < pages,
                                other=0).to(tl.int64)
                page_min = tl.minimum(page_min, entry)
                page_max = tl.maximum(page_max, entry)
    tl.store(Stats + 0, tl.min(seq_min, 0))
    tl.store(Stats + 1, tl.max(len_max, 0))
    tl.store(Stats + 2, tl.max(seq_max, 0))
    tl.store(Stats + 3, tl.min(pad_min, 0))
    tl.store(Stats + 4, tl.max(over_max, 0))
    tl.store(Stats + 5, tl.min(idx_min, 0))
    tl.store(Stats + 6, tl.max(idx_max, 0))
    tl.store(Stats + 7, tl.min(page_min, 0))
    tl.store(Stats + 8, tl.max(page_max, 0))
