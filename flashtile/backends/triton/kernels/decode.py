"""Split-KV attention against a key/value cache (Flash-Decoding), and the
kernel that merges the splits.

Decoding has a handful of query tokens per sequence, so one program per
(batch, head, query block) leaves most of the GPU idle. Here the key range
of each sequence is cut into ``num_splits`` parts; a program attends one
part for one (batch, kv head) and writes its partial output and LSE, and
the parts are merged by their log-sum-exp: by the last program of the
(batch, kv head, query block) to finish (MERGE: a counter per block, the
parts still in L2, one launch a step) or by the combine kernel.

The rows of a program are (query token, query head of the GQA group) pairs,
``row = token * group_size + head_in_group``, so the query heads that share
a kv head are processed together and each K/V tile is read once for all of
them.

The cache is contiguous ``(batch_cache, seqlen_cache, nheads_k, d)`` (with an
optional ``cache_batch_idx`` row per sequence), or paged ``(num_pages,
page_size, nheads_k, d)`` with ``block_table[b, j // page_size]`` naming the
page that holds key ``j`` of sequence ``b``; any page size works: pages
that hold whole key tiles are looked up once per tile, smaller pages once
per page of the tile (a vector of page ids) where the page size is a power
of two, else once per row. The page size is a compile-time constant.
"""

import triton
import triton.language as tl

from .tiles import BIAS_NONE, LOG2E, masked_pv, tile_mask, tile_scores

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _decode_tiles(acc, l_i, m_i, q, q_row_scale, k_base, v_base, table, tile_lo, tile_hi, rows, offs_n, offs_d,
                  offs_dv, d_ok, dv_ok, seqlen_q, seqlen_k, diag, first_key, window_left, window_right, max_pages,
                  qk_scale, softcap_in, softcap_out, alibi_slope, Q, stride_kb, stride_ks, stride_vb, stride_vs,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, ROW_LOOKUP: tl.constexpr,
                  MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                  SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, KV_FP8: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, EDGE: tl.constexpr, FP16_Q: tl.constexpr):
    """Accumulate the key tiles [tile_lo, tile_hi) into (acc, l_i, m_i) of the rows ``rows``
    (query tokens) of attn_decode_kernel; the MASK_* / HAS_LEFTPAD switches mask by
    position (keys past ``seqlen_k`` are always masked). EDGE: a loop of one or two tiles
    (a program's rows span at most BLOCK_M tokens), not pipelined. FP16_Q: ``q`` is fp16,
    each row scaled by a power of two that ``q_row_scale`` (BLOCK_M, 1) undoes on the
    scores (see attn_decode_kernel)."""
    for start_n in tl.range(tile_lo, tile_hi, BLOCK_N, num_stages=1 if EDGE else None):
        cols = start_n + offs_n
        col_ok = cols < seqlen_k
        if PAGE_SIZE % BLOCK_N == 0 and PAGE_SIZE > 0 and not ROW_LOOKUP:
            # the tile lies in one page (start_n is a multiple of BLOCK_N): one lookup (a scalar
            # load, which measured 2-6% faster with splits and 23% slower without: ROW_LOOKUP)
            page = tl.load(table + start_n // PAGE_SIZE).to(tl.int64)
            k_rows = page * stride_kb + (start_n % PAGE_SIZE + offs_n) * stride_ks
            v_rows = page * stride_vb + (start_n % PAGE_SIZE + offs_n) * stride_vs
        elif PAGE_SIZE > 0 and BLOCK_N % PAGE_SIZE == 0 and (PAGE_SIZE & (PAGE_SIZE - 1)) == 0 and not ROW_LOOKUP:
            # pages smaller than a tile: one id per page, broadcast over the page's rows
            pg = start_n // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
            page = tl.load(table + pg, mask=(pg * PAGE_SIZE < seqlen_k) & (pg < max_pages), other=0).to(tl.int64)
            # pages x rows of a page: row p * PAGE_SIZE + r is page p's row r
            page_of_row = tl.sum(tl.where(offs_n[:, None] // PAGE_SIZE == tl.arange(0, BLOCK_N // PAGE_SIZE)[None, :],
                                          page[None, :], 0), 1)
            k_rows = page_of_row * stride_kb + (offs_n % PAGE_SIZE) * stride_ks
            v_rows = page_of_row * stride_vb + (offs_n % PAGE_SIZE) * stride_vs
        elif PAGE_SIZE > 0:
            # pages not dividing a tile, or ROW_LOOKUP: look up the page of every row
            page = tl.load(table + cols // PAGE_SIZE, mask=col_ok & (cols // PAGE_SIZE < max_pages), other=0)
            k_rows = page.to(tl.int64) * stride_kb + (cols % PAGE_SIZE) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (cols % PAGE_SIZE) * stride_vs
        else:
            k_rows = cols.to(tl.int64) * stride_ks
            v_rows = cols.to(tl.int64) * stride_vs
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :], mask=col_ok[:, None] & dv_ok, other=0.0)
        if KV_FP8:
            # fp8 tiles in q's compute dtype (fp16, also for bf16 q: FP16_Q; fp32 for fp32 q or under UPCAST)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FP16_Q:
            qk = qk * q_row_scale
        s, _ = tile_scores(qk, rows, cols[None, :], seqlen_q,
                           seqlen_k, diag, qk_scale, softcap_in, softcap_out, alibi_slope, Q, 0, 0,
                           SOFTCAP, HAS_ALIBI, BIAS_NONE, False)
        allowed = tile_mask(rows, cols[None, :], seqlen_k, diag, window_left, window_right, MASK_LEFT, MASK_RIGHT)
        if HAS_LEFTPAD:
            allowed = allowed & (cols[None, :] >= first_key)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row may have seen no key yet: keep the exponent finite
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_LEFT or MASK_RIGHT or HAS_LEFTPAD:
            # keys inside the cache that a row of the tile does not see add nothing, NaN included
            acc = masked_pv(acc * alpha[:, None], p, v, allowed, DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    return acc, l_i, m_i


@triton.jit
def attn_decode_kernel(
    Q, K, V, Out, Lse, CacheSeqlens, CacheBatchIdx, BlockTable, Leftpad, Alibi, Sinks, KDescale, VDescale,
    MergedOut, MergedLse, Counters,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_osplit,
    stride_lb, stride_lh, stride_lsplit,
    stride_tb, stride_ab, stride_kdb, stride_kdh, stride_vdb, stride_vdh, stride_mb, stride_ms, stride_mh, stride_mlb, stride_mlh,
    nheads_k, seqlen_q, seqlen_new, group_size, max_pages, window_left, window_right,
    qk_scale, softcap_in, softcap_out, split_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_LOOKUP: tl.constexpr = False,
    MERGE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1, MERGE_ROWS: tl.constexpr = 1,
    HAS_SINKS: tl.constexpr = False, KV_FP8: tl.constexpr = False,
):
    """Grid: (batch * nheads_k, num_splits, cdiv(seqlen_q * group_size, BLOCK_M)).

    Q: (batch, seqlen_q, nheads, HEAD_DIM). K, V: the cache (see the module
    docstring), K's head dim HEAD_DIM and V's HEAD_DIM_V (Out's): contiguous with PAGE_SIZE = 0, else paged (ROW_LOOKUP: look
    up the page of every row even where a tile lies in one page); ``stride_kb``
    is the stride of a cache row (contiguous) or of a page (paged). Sequence
    ``b`` has ``CacheSeqlens[b] + seqlen_new`` keys, those before
    ``Leftpad[b]`` ignored; causal / window positions are aligned
    bottom-right. Out / Lse: with one split, the output (q's layout
    and dtype) and the natural-log LSE (batch, nheads, seqlen_q); with
    several, fp32 partial results of each split at ``split * stride_osplit``
    / ``split * stride_lsplit``, merged by ``attn_combine_kernel``, or with
    MERGE by the last program of the block into MergedOut / MergedLse
    (laid out as Out / Lse with one split): ``Counters`` holds a zero int32
    per (batch * nheads_k, query block), left zero for the next launch.
    BLOCK_S: a power of two >= num_splits; MERGE_ROWS: rows merged at once.
    HAS_SINKS: Sinks holds one fp32 logit per query head (attention sinks),
    counted once, by split 0, as a key of value zero.
    KV_FP8: K and V hold float8_e4m3fn values whose real values are ``value *
    descale``, with fp32 descales ``KDescale[b, hk]`` / ``VDescale[b, hk]`` (``b``
    the sequence of this call, not its cache row): the tiles are converted to q's
    compute dtype, the key descale is folded into the score scale and the value
    descale multiplies each split's output (before the merge, which is linear).
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    pid_m = tl.program_id(2)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k

    # rows of this program: (query token, query head of the group) pairs
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_r // group_size
    head = hk * group_size + offs_r % group_size
    row_ok = tok < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv[None, :] < HEAD_DIM_V

    seqlen_k = tl.load(CacheSeqlens + b) + seqlen_new
    diag = seqlen_k - seqlen_q
    first_key = 0
    if HAS_LEFTPAD:
        first_key = tl.load(Leftpad + b)
    # keys seen by any row of the block, then this split's share of their tiles
    tok_lo = pid_m * BLOCK_M // group_size
    tok_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // group_size, seqlen_q - 1)
    lo = first_key
    hi = seqlen_k
    if MASK_LEFT:
        lo = tl.maximum(lo, tok_lo + diag - window_left)
    if MASK_RIGHT:
        hi = tl.minimum(hi, tok_hi + diag + window_right + 1)
    lo = tl.maximum(lo, 0) // BLOCK_N * BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 0)
    # an even share of the tiles, or (split_tiles > 0, batch-invariant mode) a fixed number
    tiles_per_split = tl.where(split_tiles > 0, split_tiles, tl.cdiv(n_tiles, num_splits))
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)

    q_ptrs = Q + b.to(tl.int64) * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok, other=0.0)
    # bf16 queries against an e4m3 cache compute in fp16: e4m3 -> fp16 is one conversion per
    # two values, -> bf16 three (through fp16), the likely bound of the FP8 step, which ran
    # at about half the memory bandwidth on an H100. Each row of q is scaled by the power of
    # two that puts its largest finite |value| at 2^13-2^14 (exact; fp16's 11 bits hold
    # bf16's 8 down to 2^-27 of it), undone on the scores.
    FP16_Q: tl.constexpr = KV_FP8 and Q.dtype.element_ty == tl.bfloat16
    q_row_scale = 1.0
    if FP16_Q:
        qf = q.to(tl.float32)
        q_abs = tl.abs(qf)
        q_max = tl.max(tl.where(q_abs < float("inf"), q_abs, 0.0), 1)  # NaN and Inf: 0
        e = tl.where(q_max > 0, 14.0 - tl.math.ceil(tl.math.log2(q_max)), 0.0)
        e = tl.minimum(tl.maximum(e, -120.0), 120.0)
        q = (qf * tl.math.exp2(e)[:, None]).to(tl.float16)
        q_row_scale = tl.math.exp2(-e)[:, None]
    elif UPCAST:
        q = q.to(tl.float32)
    if KV_FP8:
        # one key descale per (sequence, kv head): folded into the scale of the scores
        k_descale = tl.load(KDescale + b * stride_kdb + hk * stride_kdh)
        qk_scale = qk_scale * k_descale
        softcap_in = softcap_in * k_descale
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + b * stride_ab + head, mask=row_ok, other=0.0)[:, None]

    if PAGE_SIZE > 0:
        table = BlockTable + b.to(tl.int64) * stride_tb
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
    else:
        table = BlockTable  # unused
        cache_b = b
        if HAS_BATCH_IDX:
            cache_b = tl.load(CacheBatchIdx + b)
        k_base = K + cache_b.to(tl.int64) * stride_kb + hk * stride_kh
        v_base = V + cache_b.to(tl.int64) * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        first = split == 0
        m_i = tl.where(first, tl.load(Sinks + head, mask=row_ok, other=0.0) * LOG2E, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    rows = tok[:, None]
    # tiles [mid_lo, mid_hi) are seen whole by every row of the program (no causal, window or
    # left-padding mask there): they skip the NaN-safe product, which the edge tiles around
    # them take (phases 0 and 2; only phase 1 exists without such masks)
    ANY_MASK: tl.constexpr = MASK_LEFT or MASK_RIGHT or HAS_LEFTPAD
    mid_lo = start
    mid_hi = end
    if ANY_MASK:
        seen_from = first_key
        if MASK_LEFT:
            seen_from = tl.maximum(seen_from, tok_hi + diag - window_left)
        mid_lo = tl.minimum(tl.maximum(start, tl.cdiv(tl.maximum(seen_from, 0), BLOCK_N) * BLOCK_N), end)
        if MASK_RIGHT:  # else up to the end: a partial last tile needs only the bounds
            seen_to = tl.minimum(end, tok_lo + diag + window_right + 1)
            mid_hi = tl.maximum(mid_lo, tl.minimum(end, tl.maximum(seen_to, 0) // BLOCK_N * BLOCK_N))
    for phase in tl.static_range(3):
        if phase == 0:
            tile_lo, tile_hi = start, mid_lo
        elif phase == 1:
            tile_lo, tile_hi = mid_lo, mid_hi
        else:
            tile_lo, tile_hi = mid_hi, end
        if ANY_MASK or phase == 1:
            acc, l_i, m_i = _decode_tiles(
                acc, l_i, m_i, q, q_row_scale, k_base, v_base, table, tile_lo, tile_hi, rows, offs_n, offs_d, offs_dv,
                d_ok, dv_ok, seqlen_q, seqlen_k, diag, first_key, window_left, window_right, max_pages, qk_scale,
                softcap_in, softcap_out, alibi_slope, Q, stride_kb, stride_ks, stride_vb, stride_vs,
                BLOCK_N, PAGE_SIZE, ROW_LOOKUP, MASK_LEFT and phase != 1, MASK_RIGHT and phase != 1,
                HAS_LEFTPAD and phase != 1,
                SOFTCAP, HAS_ALIBI, KV_FP8, UPCAST, DOT_PRECISION, phase != 1, FP16_Q)

    # rows that saw no key of this split: output 0, LSE -inf
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    if KV_FP8:
        acc = acc * tl.load(VDescale + b * stride_vdb + hk * stride_vdh)
    lse = tl.where(seen, m_i * LN2 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_ptrs = (Out + split.to(tl.int64) * stride_osplit + b.to(tl.int64) * stride_ob + tok[:, None] * stride_os
              + head[:, None] * stride_oh + offs_dv[None, :])
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok)
    lse_ptrs = Lse + split.to(tl.int64) * stride_lsplit + b.to(tl.int64) * stride_lb + head * stride_lh + tok
    tl.store(lse_ptrs, lse, mask=row_ok)

    if MERGE:
        # the last program of the block to count merges every split's part, all read at once
        # (reading them one after another, each an L2 round trip, measured slower than the
        # combine kernel). The barrier puts every thread's stores before the count, which
        # releases them and acquires the other programs' (acq_rel at GPU scope).
        tl.debug_barrier()
        counter = Counters + pid_bh * tl.num_programs(2) + pid_m
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            tl.store(counter, 0)  # for the next launch (CUDA graph replays reuse the counters)
            tl.debug_barrier()
            n_rows = tl.minimum(seqlen_q * group_size - pid_m * BLOCK_M, BLOCK_M)
            # MERGE_ROWS rows at a time, not pipelined (the launcher merges here only where one
            # round covers the block's rows: more rounds measured slower than the combine kernel)
            for r0 in tl.range(0, n_rows, MERGE_ROWS, num_stages=1):
                offs_mr = r0 + tl.arange(0, MERGE_ROWS)
                m_ok = offs_mr < n_rows
                m_tok = (pid_m * BLOCK_M + offs_mr) // group_size
                m_head = hk * group_size + (pid_m * BLOCK_M + offs_mr) % group_size
                part_rows = b.to(tl.int64) * stride_ob + m_tok * stride_os + m_head * stride_oh
                lse_rows = b.to(tl.int64) * stride_lb + m_head * stride_lh + m_tok
                merged, merged_lse = merge_parts(Out + part_rows[:, None] + offs_dv[None, :], Lse + lse_rows,
                                                 stride_osplit, stride_lsplit, num_splits, m_ok, dv_ok, BLOCK_S)
                merged_rows = b.to(tl.int64) * stride_mb + m_tok * stride_ms + m_head * stride_mh
                tl.store(MergedOut + merged_rows[:, None] + offs_dv[None, :],
                         merged.to(MergedOut.dtype.element_ty), mask=m_ok[:, None] & dv_ok)
                tl.store(MergedLse + b.to(tl.int64) * stride_mlb + m_head * stride_mlh + m_tok, merged_lse, mask=m_ok)


@triton.jit
def merge_parts(part_ptrs, lse_ptrs, stride_part_split, stride_lse_split, num_splits, row_ok, d_ok,
                BLOCK_S: tl.constexpr):
    """The ``num_splits`` partial results of some rows merged: split ``s``'s fp32 outputs
    at ``part_ptrs + s * stride_part_split`` (rows x D) and its natural-log LSEs at
    ``lse_ptrs + s * stride_lse_split`` (rows). Returns (rows x D, rows)
    ``sum_s exp(lse_s - lse) * part_s`` and ``lse = log sum_s exp(lse_s)``; a row no split
    saw gives zeros and LSE -inf. All splits are read at once, as (rows, splits, D), the
    splits in each thread's registers so that their sums need no exchange between
    threads (BLOCK_S >= num_splits)."""
    split_offs = tl.arange(0, BLOCK_S).to(tl.int64)
    ok = row_ok[:, None] & (split_offs < num_splits)[None, :]
    lse_parts = tl.load(lse_ptrs[:, None] + split_offs[None, :] * stride_lse_split, mask=ok, other=float("-inf"),
                        cache_modifier=".cg")
    parts = tl.load(part_ptrs[:, None, :] + (split_offs * stride_part_split)[None, :, None],
                    mask=ok[:, :, None] & d_ok[:, None, :], other=0.0, cache_modifier=".cg")
    top = tl.max(lse_parts, 1)
    top = tl.where(top == float("-inf"), 0.0, top)  # a row no split saw: keep exp finite
    w = tl.exp(lse_parts - top[:, None])
    total = tl.sum(w, 1)
    seen = total > 0.0
    merged = tl.sum(parts * w[:, :, None], 1) / tl.where(seen, total, 1.0)[:, None]
    return merged, tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf"))


@triton.jit
def attn_combine_kernel(
    OutPartial, LsePartial, Out, Lse,
    stride_pb, stride_ps, stride_ph, stride_psplit,
    stride_plb, stride_plh, stride_plsplit,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    nheads, seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid: (batch * seqlen_q * nheads,): one output row per program.

    ``out = sum_s exp(lse_s - lse) * out_s`` with ``lse = log sum_s exp(lse_s)``
    over the ``num_splits`` partial results (fp32); a row no split saw
    gives zeros and LSE -inf.
    """
    pid = tl.program_id(0)
    h = pid % nheads
    t = (pid // nheads) % seqlen_q
    b = pid // (nheads * seqlen_q)
    offs_d = tl.arange(0, BLOCK_D)
    # one row, as a block of one
    rows = b.to(tl.int64) * stride_pb + t * stride_ps + h * stride_ph + tl.zeros([1], tl.int64)
    lse_row = b.to(tl.int64) * stride_plb + h * stride_plh + t + tl.zeros([1], tl.int64)
    d_ok = offs_d[None, :] < HEAD_DIM
    out, lse = merge_parts(OutPartial + rows[:, None] + offs_d[None, :], LsePartial + lse_row, stride_psplit,
                           stride_plsplit, num_splits, tl.full([1], True, tl.int1), d_ok, BLOCK_S)
    tl.store(Out + b.to(tl.int64) * stride_ob + t * stride_os + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + t + tl.zeros([1], tl.int64), lse)
