"""FlashAttention forward kernel (FlashAttention-2 schedule).

One program owns BLOCK_M query rows of one (batch, head). Key/value tiles of
BLOCK_N rows stream past it; a running row max ``m`` and row sum ``l`` (online
softmax, base 2 with ``log2(e)`` folded into the scale) rescale the partial
output, which is normalised once at the end. Only the output and the
natural-log LSE per row are written.

Options are ``tl.constexpr`` switches of this one kernel, so the plain
causal / non-causal kernels compile without any of their code: sliding
window (MASK_LEFT / MASK_RIGHT), softcap, ALiBi, an additive or boolean bias
(SDPA's attn_mask), dropout, variable-length batches (IS_VARLEN: sequence
``b`` occupies rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of a packed tensor),
and a fixed softmax offset (FIXED_MAX, cosine-similarity attention: with
l2-normalised q and k every score is bounded by a constant known on the
host, so ``m`` is that constant instead of a running row max: no row max,
no rescaling of the partial output per tile).

A launch switch, TWO_HALVES, makes the program's query block two halves that
share each K/V tile: both halves' scores first, then half a's softmax and
P V product, then half b's. Triton keeps a P V product (an accumulation) in
flight on the tensor cores, so half a's matmul runs under half b's softmax:
FlashAttention-3's softmax/matmul overlap, which Triton 3.6 does not build
by itself on Hopper.
"""

import triton
import triton.language as tl

from .fp8 import to_e4m3
from .tiles import (
    BIAS_NONE,
    LOG2E,
    dropout_keep,
    key_ranges,
    masked_pv,
    pattern_mask,
    program_tile,
    sparse_tile,
    tile_mask,
    tile_scores,
)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, rows, cols, seqlen_q, seqlen_k, diag, window_left, window_right,
                qk_scale, softcap_in, softcap_out, alibi_slope, bias_base, stride_bm, stride_bn, bh,
                max_seqlen_q, max_seqlen_k, dropout_p, seed, Patterns, pattern, row0, col0, start_n,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr,
                DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, FIXED_MAX: tl.constexpr,
                SPARSE: tl.constexpr, SPARSE_BM: tl.constexpr, SPARSE_BN: tl.constexpr,
                FP8: tl.constexpr = False, EXACT_FP8: tl.constexpr = False):
    """One key tile for the query ``rows``: scores from the raw products ``qk``,
    mask, online softmax into (acc, l_i, m_i), and ``acc += P V``. With FP8, ``v`` is
    float8_e4m3fn (its descale applied at the end) and P is rounded to e4m3 for the
    product, as FlashAttention-3 does; masked tiles take P and V in fp16 instead (e4m3
    values are exact in fp16), where the NaN-safe product needs arithmetic on V."""
    # a row may have seen no key yet (m = -inf): guard the exponent's offset
    SAFE_MAX: tl.constexpr = MASKED or BIAS_KIND != BIAS_NONE
    s, _ = tile_scores(qk, rows, cols, seqlen_q, seqlen_k, diag, qk_scale, softcap_in, softcap_out, alibi_slope,
                       bias_base, stride_bm, stride_bn, SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS)
    if MASKED:
        allowed = tile_mask(rows, cols, seqlen_k, diag, window_left, window_right, MASK_LEFT, MASK_RIGHT)
        if SPARSE:
            allowed = allowed & pattern_mask(Patterns, pattern, rows, cols, row0, col0, start_n, SPARSE_BM,
                                              SPARSE_BN, BLOCK_N)
        s = tl.where(allowed, s, float("-inf"))
    if FIXED_MAX:
        # s <= m_i by construction (masked scores are -inf): nothing to rescale
        p = tl.math.exp2(s - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SAFE_MAX:
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    if DROPOUT:
        # the row sum keeps every probability; only the product with V drops
        p = tl.where(dropout_keep(seed, bh, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p), p, 0.0)
    if MASKED:
        if FP8:
            v = v.to(tl.float16)
        acc = masked_pv(acc, p, v, allowed, DOT_PRECISION)
    elif FP8:
        # 0 <= p <= 1: the plain cast needs no saturation (under the interpreter it needs EXACT)
        p8 = to_e4m3(p, True) if EXACT_FP8 else p.to(tl.float8e4nv)
        acc = tl.dot(p8, v, acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, acc_b, l_b, m_b, q_b, k_src, v_src, stride_ks, stride_vs, bias_base, stride_bm,
               stride_bn, offs_m, offs_m_b, offs_n, offs_d, offs_dv, start, end, seqlen_q, seqlen_k, diag,
               window_left, window_right, qk_scale, softcap_in, softcap_out, alibi_slope, bh, max_seqlen_q,
               max_seqlen_k, dropout_p, seed,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
               SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
               KV_DESC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, desc_b=0, desc_row=0, desc_h=0,
               FIXED_MAX: tl.constexpr = False, tile_list=0, Patterns=0, row0=0,
               SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1,
               SPARSE_STAGES: tl.constexpr = 0, TWO_HALVES: tl.constexpr = False,
               table=0, max_pages=0, stride_kp=0, stride_vp=0, PAGE_SIZE: tl.constexpr = 0,
               q_scale=1.0, q_scale_b=1.0, k_scales=0, FP8: tl.constexpr = False,
               K_SCALE_BLOCKS: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 128,
               EXACT_FP8: tl.constexpr = False, V_SEQ_MAJOR: tl.constexpr = False):
    """Accumulate key tiles [start, end) into (acc, l_i, m_i) of the query rows
    ``offs_m`` and, with TWO_HALVES, into (acc_b, l_b, m_b) of the rows ``offs_m_b``
    (``q_b``); otherwise the ``_b`` arguments are unused and returned as given.

    ``k_src``/``v_src`` are pointer blocks at key row 0 (KV_DESC = 0), 2-D
    tensor descriptors of this (batch, kv head) built in the kernel (1), or
    4-D descriptors of the whole (batch, seqlen, heads, dim) tensor built on
    the host (2), read at (``desc_b``, ``desc_row`` + key, ``desc_h``).
    Descriptors read out-of-range rows and columns as zero. MASKED applies
    the positional mask (bounds, causal, window). With FIXED_MAX, ``m_i`` is a
    constant bound of the scores (log2 units) and stays as it is.

    TWO_HALVES: both halves' scores are computed first, then each half's softmax
    and P V product. The first half's P V product accumulates into a
    loop-carried tile, which Triton leaves in flight on the tensor cores
    while the second half's softmax runs (FlashAttention-3's overlap of
    softmax and matmul, within one program).

    SPARSE (block-sparse attention): ``start``/``end`` count kernel tiles of
    the key-block list ``tile_list`` (see ``sparse_step``); MASKED tiles are
    then partial tiles, masked by their pattern (the query block of this
    program starts at row ``row0``).

    PAGE_SIZE > 0 (paged keys and values): ``k_src``/``v_src`` point at this kv
    head of page 0, key ``j`` lies in page ``table[j // PAGE_SIZE]`` (pages
    ``stride_kp``/``stride_vp`` apart) at row ``j % PAGE_SIZE``; a tile within one
    page looks its page up once, smaller pages once per row.
    """
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    rows = offs_m[:, None]
    rows_b = offs_m_b[:, None]
    SUB: tl.constexpr = SPARSE_BN // BLOCK_N
    # block-sparse loops: stages for the tile list read ahead (see sparse_tile); partial tiles
    # also stream their pattern bits: two stages there, so that the full tiles' loop fits the
    # deeper pipeline in shared memory
    LOOP_STAGES: tl.constexpr = (2 if MASKED else SPARSE_STAGES) if SPARSE and SPARSE_STAGES > 0 else None
    for it in tl.range(start, end, 1 if SPARSE else BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPECIALIZE):
        if SPARSE:
            start_n, col0, pattern = sparse_tile(tile_list, it, SUB, SPARSE_BN, BLOCK_N, MASKED)
        else:
            start_n, col0, pattern = it, 0, 0
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kv_rows = start_n + offs_n
        if PAGE_SIZE > 0:
            if PAGE_SIZE % BLOCK_N == 0:
                page = tl.load(table + start_n // PAGE_SIZE).to(tl.int64)
                in_page = start_n % PAGE_SIZE + offs_n
            else:
                page = tl.load(table + kv_rows // PAGE_SIZE,
                               mask=(kv_rows < seqlen_k) & (kv_rows // PAGE_SIZE < max_pages), other=0).to(tl.int64)
                in_page = kv_rows % PAGE_SIZE
            if KV_DESC == 1 and PAGE_SIZE % BLOCK_N == 0:
                # descriptors over the stacked pages (see the kernel): the tile is rows of one page;
                # its rows past seqlen_k hold whatever the page holds, which masked_pv keeps out
                row = (page * PAGE_SIZE + start_n % PAGE_SIZE).to(tl.int32)
                k = k_src.load([row, 0])
                v = v_src.load([row, 0])
            else:
                k_rows = page * stride_kp + in_page * stride_ks
                v_rows = page * stride_vp + in_page * stride_vs
                k_ok, v_ok = d_ok, dv_ok
                if MASKED:
                    k_ok = (kv_rows[:, None] < seqlen_k) & d_ok
                    v_ok = (kv_rows[:, None] < seqlen_k) & dv_ok
                k = tl.load(k_src + k_rows[:, None] + offs_d[None, :], mask=k_ok, other=0.0)
                v = tl.load(v_src + v_rows[:, None] + offs_dv[None, :], mask=v_ok, other=0.0)
        elif KV_DESC == 1:
            k = k_src.load([start_n, 0])
            if V_SEQ_MAJOR:
                v = tl.trans(v_src.load([0, start_n]))
            else:
                v = v_src.load([start_n, 0])
        elif KV_DESC == 2:
            k = k_src.load([desc_b, desc_row + start_n, desc_h, 0]).reshape([BLOCK_N, BLOCK_D])
            v = v_src.load([desc_b, desc_row + start_n, desc_h, 0]).reshape([BLOCK_N, BLOCK_DV])
        elif HEAD_DIM == BLOCK_D and HEAD_DIM_V == BLOCK_DV and not MASKED:
            k = tl.load(k_src + start_n * stride_ks)
            v = tl.load(v_src + start_n * stride_vs)
        else:
            k_ok, v_ok = d_ok, dv_ok
            if MASKED:
                k_ok = (kv_rows[:, None] < seqlen_k) & d_ok
                v_ok = (kv_rows[:, None] < seqlen_k) & dv_ok
            k = tl.load(k_src + start_n * stride_ks, mask=k_ok, other=0.0)
            v = tl.load(v_src + start_n * stride_vs, mask=v_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        cols = kv_rows[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if TWO_HALVES:
            qk_b = tl.dot(q_b, tl.trans(k), input_precision=DOT_PRECISION)
        tile_scale, tile_scale_b = qk_scale, qk_scale
        softcap_t, softcap_t_b = softcap_in, softcap_in
        if FP8:
            descale = q_scale
            descale_b = q_scale_b
            if K_SCALE_BLOCKS:
                if BLOCK_N <= SCALE_BLOCK:
                    k_scale = tl.load(k_scales + start_n // SCALE_BLOCK)  # one scale block holds the tile
                else:
                    k_scale = tl.load(k_scales + kv_rows // SCALE_BLOCK, mask=kv_rows < seqlen_k, other=0.0)[None, :]
                descale = descale * k_scale
                descale_b = descale_b * k_scale
            tile_scale, softcap_t = qk_scale * descale, softcap_in * descale
            tile_scale_b, softcap_t_b = qk_scale * descale_b, softcap_in * descale_b
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, rows, cols, seqlen_q, seqlen_k, diag, window_left,
                                    window_right, tile_scale, softcap_t, softcap_out, alibi_slope, bias_base,
                                    stride_bm, stride_bn, bh, max_seqlen_q, max_seqlen_k, dropout_p, seed,
                                    Patterns, pattern, row0, col0, start_n, BLOCK_N, MASKED, MASK_LEFT,
                                    MASK_RIGHT, SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS, DROPOUT, DOT_PRECISION,
                                    FIXED_MAX, SPARSE, SPARSE_BM, SPARSE_BN, FP8, EXACT_FP8)
        if TWO_HALVES:
            acc_b, l_b, m_b = _softmax_pv(acc_b, l_b, m_b, qk_b, v, rows_b, cols, seqlen_q, seqlen_k, diag,
                                          window_left, window_right, tile_scale_b, softcap_t_b, softcap_out, alibi_slope,
                                          bias_base, stride_bm, stride_bn, bh, max_seqlen_q, max_seqlen_k,
                                          dropout_p, seed, Patterns, pattern, row0, col0, start_n, BLOCK_N, MASKED,
                                          MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS, DROPOUT,
                                          DOT_PRECISION, FIXED_MAX, SPARSE, SPARSE_BM, SPARSE_BN, FP8, EXACT_FP8)
    return acc, l_i, m_i, acc_b, l_b, m_b


@triton.jit
def _load_rows_q(q_base, offs_m, offs_d, stride_qs, seqlen_q, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The query rows ``offs_m`` (zero past seqlen_q and HEAD_DIM)."""
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _fp8_scales(QDescale, KDescale, VDescale, stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, b, hk,
                offs_m, offs_m_b, seqlen_q, Q_SCALE_BLOCKS: tl.constexpr, K_SCALE_BLOCKS: tl.constexpr,
                SCALE_BLOCK: tl.constexpr, TWO_HALVES: tl.constexpr):
    """The descales of an FP8 program (see attn_fwd_kernel): (q_scale, q_scale_b,
    k_scales, v_scale). ``q_scale`` (``q_scale_b``: the second half's rows) is a scalar,
    or with Q_SCALE_BLOCKS a ``[ROWS, 1]`` block, and carries the key scale unless
    K_SCALE_BLOCKS; ``k_scales`` then points at this (sequence, kv head)'s key scales."""
    q_base = QDescale + b.to(tl.int64) * stride_qdb + hk * stride_qdh
    k_scales = KDescale + b.to(tl.int64) * stride_kdb + hk * stride_kdh
    if Q_SCALE_BLOCKS:
        q_scale = tl.load(q_base + offs_m // SCALE_BLOCK, mask=offs_m < seqlen_q, other=0.0)[:, None]
        q_scale_b = q_scale
        if TWO_HALVES:
            q_scale_b = tl.load(q_base + offs_m_b // SCALE_BLOCK, mask=offs_m_b < seqlen_q, other=0.0)[:, None]
    else:
        q_scale = tl.load(q_base)
        q_scale_b = q_scale
    if not K_SCALE_BLOCKS:
        k_scale = tl.load(k_scales)
        q_scale = q_scale * k_scale
        q_scale_b = q_scale_b * k_scale
    v_scale = tl.load(VDescale + b.to(tl.int64) * stride_vdb + hk)
    return q_scale, q_scale_b, k_scales, v_scale


@triton.jit
def _init_rows(fixed_max, sink, ROWS: tl.constexpr, BLOCK_DV: tl.constexpr, FIXED_MAX: tl.constexpr,
               HAS_SINKS: tl.constexpr):
    """(acc, l, m) of ROWS query rows before any key; with HAS_SINKS, after the
    sink (``sink``, log2 units): a key of score ``sink`` whose value is zero."""
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if HAS_SINKS:
        m_i = tl.zeros([ROWS], dtype=tl.float32) + sink
        l_i = l_i + 1.0
    elif FIXED_MAX:
        m_i = tl.full([ROWS], fixed_max, dtype=tl.float32)
    else:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    return tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32), l_i, m_i


@triton.jit
def _store_rows(acc, l_i, m_i, o_base, lse_base, offs_m, offs_dv, stride_os, seqlen_q, dropout_scale,
                HEAD_DIM_V: tl.constexpr, DROPOUT: tl.constexpr):
    """Normalise and write the output rows ``offs_m`` and their LSE; rows that saw
    no key get output 0 and LSE -inf."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    if DROPOUT:
        l_safe = l_safe / dropout_scale
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], acc.to(o_base.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse, CuSeqlensQ, CuSeqlensK, Bias, Alibi, Sinks,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
    nheads, group_size, max_seqlen_q, max_seqlen_k, diag_offset, window_left, window_right,
    qk_scale, softcap_in, softcap_out, dropout_p, dropout_scale, seed, fixed_max,
    FullList, PartList, Patterns, sparse_sb, sparse_sh, full_row, part_row, tail_bh,
    SeqUsedK, BlockTable, stride_tb, max_pages, num_pages,
    QDescale, KDescale, VDescale, stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, stride_vd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_DESC: tl.constexpr = 0, WARP_SPECIALIZE: tl.constexpr = False, FIXED_MAX: tl.constexpr = False,
    SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1,
    SPARSE_STAGES: tl.constexpr = 0, TWO_HALVES: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
    HAS_SEQUSED: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 0,
    FP8: tl.constexpr = False, Q_SCALE_BLOCKS: tl.constexpr = False, K_SCALE_BLOCKS: tl.constexpr = False,
    SCALE_BLOCK: tl.constexpr = 128, EXACT_FP8: tl.constexpr = False, V_SEQ_MAJOR: tl.constexpr = False,
):
    """Grid: (cdiv(max_seqlen_q, BLOCK_M) * batch * nheads,), the last ``tail_bh``
    (batch, head) pairs issued longest first (see ``program_tile``).

    Q: (batch, seqlen_q, nheads, HEAD_DIM); K: (batch, seqlen_k, nheads //
    group_size, HEAD_DIM); V: (batch, seqlen_k, nheads // group_size,
    HEAD_DIM_V); Out: (batch, seqlen_q, nheads, HEAD_DIM_V); last dims
    contiguous, other strides free (BLOCK_D, BLOCK_DV: the head dims padded).
    With IS_VARLEN the batch strides are 0 and sequence ``b`` starts at row
    ``CuSeqlensQ[b]`` / ``CuSeqlensK[b]``. Lse: fp32, natural log, row ``i``
    of (b, h) at ``b * stride_lb + h * stride_lh + start_q + i``. Bias:
    (batch, nheads, seqlen_q, seqlen_k) through strides (0 where broadcast);
    Alibi: fp32 slopes at ``b * stride_ab + h``. With KV_DESC = 2, K and V
    are host-built tensor descriptors (see ``_fwd_tiles``). ``qk_scale`` is
    softmax_scale * log2(e); ``dropout_scale`` is 1 / (1 - dropout_p).
    With FIXED_MAX, ``fixed_max`` (log2 units) replaces the running row max:
    every score must be at most ``fixed_max`` plus a small margin (the
    launcher sets it so that P stays below the fp16 range); the LSE written
    is still the exact natural-log LSE.

    With SPARSE (block-sparse attention, blocks of SPARSE_BM x SPARSE_BN,
    BLOCK_M dividing SPARSE_BM and BLOCK_N dividing SPARSE_BN), the program
    visits only the key blocks listed for its query block: row ``(b *
    sparse_sb + h * sparse_sh + query block)`` of FullList (``full_row``
    int32 each: a count, then key blocks) and PartList (``part_row`` each: a
    count, then (key block, pattern id) pairs; patterns are bit-packed in
    Patterns, see ``pattern_mask``).

    TWO_HALVES: the BLOCK_M rows are two halves whose softmax and P V products
    alternate, so that matmuls overlap the softmax (see ``_fwd_tiles``).

    HAS_SINKS: Sinks holds one fp32 logit per head (natural units) that joins
    every row's softmax as a key of value zero: the online softmax starts
    from it (m = sink, l = 1), and the LSE written includes it.

    Varlen only: HAS_SEQUSED: sequence ``b`` uses its first ``SeqUsedK[b]`` keys
    (not ``CuSeqlensK[b+1] - CuSeqlensK[b]``). PAGE_SIZE > 0: K and V are paged,
    (num_pages, PAGE_SIZE, nheads_k, dim) with page strides ``stride_kb`` /
    ``stride_vb``, sequence ``b``'s key ``j`` in page ``BlockTable[b * stride_tb
    + j // PAGE_SIZE]`` (``max_pages`` a row); CuSeqlensK then only gives lengths.
    With KV_DESC = 1 the ``num_pages`` pages must lie ``PAGE_SIZE`` rows apart
    (``stride_kb == PAGE_SIZE * stride_ks``, likewise V): tensor descriptors then
    span the stacked pages of the program's kv head, and tiles of BLOCK_N
    dividing PAGE_SIZE are read through them (other tiles take pointer loads).

    FP8: Q, K, V are float8_e4m3fn, real values being the stored ones times their
    descales (fp32): QDescale at ``b * stride_qdb + (h // group_size) * stride_qdh``,
    then, with Q_SCALE_BLOCKS, one per SCALE_BLOCK query rows of the sequence;
    KDescale likewise (K_SCALE_BLOCKS: one per SCALE_BLOCK keys); VDescale at ``b *
    stride_vdb + h // group_size``, applied to the output. Out has its own dtype.
    V's head dim has stride ``stride_vd`` (1 but with FP8, where V comes sequence-major:
    Hopper's FP8 tensor-core product wants the P V product's second operand so);
    V_SEQ_MAJOR says so to the tensor descriptors (KV_DESC = 1), which then read
    [BLOCK_DV, BLOCK_N] tiles of V's transpose.
    EXACT_FP8: round P to e4m3 in integer arithmetic first (see kernels/fp8.py).
    """
    tl.static_assert(not (HAS_SINKS and FIXED_MAX), "sinks need the running row max")
    tl.static_assert(PAGE_SIZE == 0 or (IS_VARLEN and KV_DESC <= 1 and not SPARSE and not V_SEQ_MAJOR),
                     "paged K/V: varlen, pointer loads or in-kernel descriptors")
    pid_m, pid_bh = program_tile(max_seqlen_q, BLOCK_M, MASK_RIGHT and not MASK_LEFT, tail_bh)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group_size
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:
        start_q = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - start_q
        start_k = tl.load(CuSeqlensK + b)
        seqlen_k = tl.load(CuSeqlensK + b + 1) - start_k
        if HAS_SEQUSED:
            seqlen_k = tl.load(SeqUsedK + b)
        diag = seqlen_k - seqlen_q
        if start_m >= seqlen_q:
            return
    else:
        start_q = 0
        seqlen_q = max_seqlen_q
        start_k = 0
        seqlen_k = max_seqlen_k
        diag = diag_offset

    ROWS: tl.constexpr = BLOCK_M // 2 if TWO_HALVES else BLOCK_M  # rows of each half
    offs_m = start_m + tl.arange(0, ROWS)
    offs_m_b = offs_m + ROWS
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qs + h * stride_qh
    table = BlockTable
    if PAGE_SIZE > 0:
        # paged: key rows are found through the block table, tile by tile (see _fwd_tiles)
        k_src = K + hk * stride_kh
        v_src = V + hk * stride_vh
        table = BlockTable + b.to(tl.int64) * stride_tb
        if KV_DESC == 1 and PAGE_SIZE % BLOCK_N == 0:
            k_src = tl.make_tensor_descriptor(k_src, shape=[num_pages * PAGE_SIZE, HEAD_DIM], strides=[stride_ks, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            v_src = tl.make_tensor_descriptor(v_src, shape=[num_pages * PAGE_SIZE, HEAD_DIM_V],
                                              strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_DV])
    elif KV_DESC == 2:
        k_src = K
        v_src = V
    else:
        k_base = K + b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_ks + hk * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vs + hk * stride_vh
        if KV_DESC == 1:
            # bulk tensor copies of [BLOCK_N, BLOCK_D] tiles; bounds give zero fill
            k_src = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_ks, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            if V_SEQ_MAJOR:
                v_src = tl.make_tensor_descriptor(v_base, shape=[HEAD_DIM_V, seqlen_k], strides=[stride_vd, 1],
                                                  block_shape=[BLOCK_DV, BLOCK_N])
            else:
                v_src = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM_V], strides=[stride_vs, 1],
                                                  block_shape=[BLOCK_N, BLOCK_DV])
        else:
            k_src = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
            v_src = v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd
    # host descriptors span the whole tensor: varlen batches are one sequence of all tokens
    desc_b = 0 if IS_VARLEN else b
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + b * stride_ab + h)

    sink = 0.0
    if HAS_SINKS:
        sink = tl.load(Sinks + h) * LOG2E
    q = _load_rows_q(q_base, offs_m, offs_d, stride_qs, seqlen_q, HEAD_DIM, UPCAST)
    acc, l_i, m_i = _init_rows(fixed_max, sink, ROWS, BLOCK_DV, FIXED_MAX, HAS_SINKS)
    if TWO_HALVES:
        q_b = _load_rows_q(q_base, offs_m_b, offs_d, stride_qs, seqlen_q, HEAD_DIM, UPCAST)
        acc_b, l_b, m_b = _init_rows(fixed_max, sink, ROWS, BLOCK_DV, FIXED_MAX, HAS_SINKS)
    else:
        q_b, acc_b, l_b, m_b = 0.0, 0.0, 0.0, 0.0
    q_scale, q_scale_b, k_scales, v_scale = 1.0, 1.0, KDescale, 1.0
    if FP8:
        q_scale, q_scale_b, k_scales, v_scale = _fp8_scales(
            QDescale, KDescale, VDescale, stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, b, hk,
            offs_m, offs_m_b, seqlen_q, Q_SCALE_BLOCKS, K_SCALE_BLOCKS, SCALE_BLOCK, TWO_HALVES)

    bh = b * nheads + h
    if SPARSE:
        q_blk = start_m // SPARSE_BM
        list_row = b * sparse_sb + h * sparse_sh + q_blk
        for part in tl.static_range(2):
            # partial tiles (pattern-masked; a row may see no key yet), then full tiles
            if part == 0:
                tile_list = PartList + list_row * part_row
            else:
                tile_list = FullList + list_row * full_row
            acc, l_i, m_i, acc_b, l_b, m_b = _fwd_tiles(
                                       acc, l_i, m_i, q, acc_b, l_b, m_b, q_b, k_src, v_src, stride_ks, stride_vs,
                                       bias_base, stride_bm, stride_bn, offs_m, offs_m_b, offs_n, offs_d, offs_dv,
                                       0, tl.load(tile_list) * (SPARSE_BN // BLOCK_N), seqlen_q, seqlen_k, diag,
                                       window_left, window_right, qk_scale, softcap_in, softcap_out, alibi_slope, bh,
                                       max_seqlen_q, max_seqlen_k, dropout_p, seed,
                                       HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, part == 0, MASK_LEFT, MASK_RIGHT, SOFTCAP,
                                       HAS_ALIBI, BIAS_KIND, BIAS_ROWS, DROPOUT, UPCAST, DOT_PRECISION, KV_DESC,
                                       WARP_SPECIALIZE and part == 1, desc_b, start_k, hk, FIXED_MAX,
                                       tile_list + 1, Patterns, q_blk * SPARSE_BM, SPARSE, SPARSE_BM, SPARSE_BN,
                                       SPARSE_STAGES, TWO_HALVES, q_scale=q_scale, q_scale_b=q_scale_b,
                                       k_scales=k_scales, FP8=FP8, K_SCALE_BLOCKS=K_SCALE_BLOCKS,
                                       SCALE_BLOCK=SCALE_BLOCK, EXACT_FP8=EXACT_FP8, V_SEQ_MAJOR=V_SEQ_MAJOR)
    else:
        lo, full_lo, full_hi, hi = key_ranges(start_m, seqlen_k, diag, window_left, window_right,
                                              BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT)
        for part in tl.static_range(3):
            # masked tiles before the band's full part (sliding window), the full part, masked tiles after it
            if part == 0:
                start, end = lo, full_lo
            elif part == 1:
                start, end = full_lo, full_hi
            else:
                start, end = full_hi, hi
            if (part != 0) or MASK_LEFT:
                acc, l_i, m_i, acc_b, l_b, m_b = _fwd_tiles(
                                           acc, l_i, m_i, q, acc_b, l_b, m_b, q_b, k_src, v_src, stride_ks,
                                           stride_vs, bias_base, stride_bm, stride_bn, offs_m, offs_m_b, offs_n,
                                           offs_d, offs_dv, start, end, seqlen_q,
                                           seqlen_k, diag, window_left, window_right, qk_scale, softcap_in,
                                           softcap_out, alibi_slope, bh, max_seqlen_q, max_seqlen_k, dropout_p,
                                           seed, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, part != 1, MASK_LEFT, MASK_RIGHT,
                                           SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS, DROPOUT, UPCAST, DOT_PRECISION,
                                           KV_DESC, WARP_SPECIALIZE and part == 1, desc_b, start_k, hk, FIXED_MAX,
                                           TWO_HALVES=TWO_HALVES, table=table, max_pages=max_pages,
                                           stride_kp=stride_kb, stride_vp=stride_vb, PAGE_SIZE=PAGE_SIZE,
                                           q_scale=q_scale, q_scale_b=q_scale_b, k_scales=k_scales, FP8=FP8,
                                           K_SCALE_BLOCKS=K_SCALE_BLOCKS, SCALE_BLOCK=SCALE_BLOCK,
                                           EXACT_FP8=EXACT_FP8, V_SEQ_MAJOR=V_SEQ_MAJOR)

    if FP8:
        acc = acc * v_scale
        if TWO_HALVES:
            acc_b = acc_b * v_scale
    o_base = Out + b.to(tl.int64) * stride_ob + start_q.to(tl.int64) * stride_os + h * stride_oh
    lse_base = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + start_q
    _store_rows(acc, l_i, m_i, o_base, lse_base, offs_m, offs_dv, stride_os, seqlen_q, dropout_scale, HEAD_DIM_V,
                DROPOUT)
    if TWO_HALVES:
        _store_rows(acc_b, l_b, m_b, o_base, lse_base, offs_m_b, offs_dv, stride_os, seqlen_q, dropout_scale,
                    HEAD_DIM_V, DROPOUT)
