"""FlashAttention backward kernels.

Two launches, no atomics (so gradients are bitwise deterministic):

1. ``attn_bwd_dq_kernel``: one program owns BLOCK_M query rows of one head
   and loops over key blocks, as the forward pass does. It first computes
   ``delta = rowsum(dO * O)`` of its rows (it loads their dO anyway) and
   writes it for the second kernel: no separate pass over O and dO.
2. ``attn_bwd_dkdv_kernel``: one program owns BLOCK_N keys of one kv head;
   it keeps K, V, dK, dV on chip and loops over every query head of its
   group and over the query blocks that see those keys, recomputing
   ``P = exp(S - LSE)`` from the saved LSE. dK/dV of a GQA group are
   therefore summed in registers. It also writes dS, the gradient of an
   additive bias, when one is asked for (each element is visited once).

The options are the forward kernel's constexpr switches; scores come from the
same ``tile_scores`` so forward and backward agree exactly. With dropout,
``dP`` is masked and rescaled like ``P`` was; ``delta`` needs no change since
``rowsum(dO * O)`` already equals ``rowsum(P * dropped dP)``.
"""

import triton
import triton.language as tl

from .tiles import (
    dropout_keep,
    key_ranges,
    load_rows,
    masked_pv,
    pattern_mask,
    program_tile,
    query_ranges,
    row_source,
    sparse_entry,
    sparse_step,
    tile_mask,
    tile_scores,
)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_lse_log2(Lse, offs, seqlen_q):
    """LSE in base 2. Rows that saw no key (LSE = -inf) get +inf so that P = 0."""
    lse = tl.load(Lse + offs, mask=offs < seqlen_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * LOG2E


@triton.jit
def _seq_bounds(CuSeqlensQ, CuSeqlensK, SeqUsedK, b, max_seqlen_q, max_seqlen_k, diag_offset,
                IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(start_q, seqlen_q, start_k, seqlen_k, diag) of sequence ``b``; with HAS_SEQUSED its
    first ``SeqUsedK[b]`` keys only."""
    if IS_VARLEN:
        start_q = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - start_q
        start_k = tl.load(CuSeqlensK + b)
        seqlen_k = tl.load(CuSeqlensK + b + 1) - start_k
        if HAS_SEQUSED:
            seqlen_k = tl.load(SeqUsedK + b)
        diag = seqlen_k - seqlen_q
    else:
        start_q = 0
        seqlen_q = max_seqlen_q
        start_k = 0
        seqlen_k = max_seqlen_k
        diag = diag_offset
    return start_q, seqlen_q, start_k, seqlen_k, diag


@triton.jit
def _tile_probs(qk, rows, cols, lse, seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_in,
                softcap_out, alibi_slope, bias_base, stride_bm, stride_bn, Patterns, pattern, row0, col0, start_n,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr,
                SPARSE: tl.constexpr, SPARSE_BM: tl.constexpr, SPARSE_BN: tl.constexpr):
    """P of one tile from its raw products ``qk`` (and the softcap's tanh, for its
    derivative), in either layout: ``rows`` / ``cols`` (query / key indices) and the
    base-2 ``lse`` of the rows broadcast to the tile (``[:, None]`` for a [queries,
    keys] tile, ``[None, :]`` for the dK/dV kernel's transposed one). MASKED:
    the mask of a partial tile; SPARSE: and of its block pattern, the program's
    BLOCK_N keys starting at ``start_n``. Also returns the mask (True without MASKED)."""
    s, t = tile_scores(qk, rows, cols, seqlen_q, seqlen_k, diag, qk_scale, softcap_in, softcap_out, alibi_slope,
                       bias_base, stride_bm, stride_bn, SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS)
    p = tl.math.exp2(s - lse)
    allowed = True
    if MASKED:
        allowed = tile_mask(rows, cols, seqlen_k, diag, window_left, window_right, MASK_LEFT, MASK_RIGHT)
        if SPARSE:
            allowed = allowed & pattern_mask(Patterns, pattern, rows, cols, row0, col0, start_n, SPARSE_BM,
                                              SPARSE_BN, BLOCK_N)
        p = tl.where(allowed, p, 0.0)
    return p, t, allowed


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                bias_base, stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn,
                offs_m, offs_n, offs_d, offs_dv, start, end, seqlen_q, seqlen_k, diag, window_left, window_right,
                qk_scale, softcap_in, softcap_out, alibi_slope, bh, max_seqlen_q, max_seqlen_k,
                dropout_p, dropout_scale, seed,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr,
                BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, USE_DESC: tl.constexpr, tile_list=0, Patterns=0, col0=0,
                SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1,
                key_start=0, BLOCK_N: tl.constexpr = 16, PART: tl.constexpr = 0):
    """Accumulate query tiles [start, end) into (dk, dv) for one key block
    (PART: 0 both, 1 dv only, 2 dk only; the other is returned as given).
    Tiles are held transposed: [BLOCK_N keys, BLOCK_M queries]. ``q_ptrs`` /
    ``do_ptrs`` are ``row_source`` s. SPARSE: ``start``/``end`` count
    kernel tiles of the query-block list ``tile_list``; MASKED tiles are
    partial tiles, masked by their pattern (this key block's mask block
    starts at key ``col0``, the program's BLOCK_N keys at ``key_start``)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    cols = offs_n[:, None]
    SUB: tl.constexpr = SPARSE_BM // BLOCK_M
    if SPARSE:
        nxt_blk, nxt_pattern = sparse_entry(tile_list, start // SUB, start < end, MASKED)
    for it in range(start, end, 1 if SPARSE else BLOCK_M):
        if SPARSE:
            pattern = nxt_pattern
            start_m, row0, nxt_blk, nxt_pattern = sparse_step(tile_list, it, end, nxt_blk, SUB, SPARSE_BM, BLOCK_M,
                                                              MASKED)
        else:
            start_m, row0, pattern = it, 0, 0
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows_1d = start_m + offs_m
        rows = rows_1d[None, :]
        q = load_rows(q_ptrs, start_m, stride_qs, rows_1d, seqlen_q, d_ok, USE_DESC)
        do = load_rows(do_ptrs, start_m, stride_dos, rows_1d, seqlen_q, dv_ok, USE_DESC)
        lse = _load_lse_log2(lse_ptr, rows_1d, seqlen_q)
        if PART != 1:
            delta = tl.load(delta_ptr + rows_1d, mask=rows_1d < seqlen_q, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        p_t, t_t, _ = _tile_probs(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), rows, cols, lse[None, :],
                               seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_in,
                               softcap_out, alibi_slope, bias_base, stride_bm, stride_bn, Patterns, pattern, row0,
                               col0, key_start, BLOCK_N, MASKED, MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI,
                               BIAS_KIND, BIAS_ROWS, SPARSE, SPARSE_BM, SPARSE_BN)
        if PART != 1:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, bh, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
            if PART != 2:
                dv = tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, dv,
                            input_precision=DOT_PRECISION)
            if PART != 1:
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        elif PART != 2:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if PART != 1:
            ds_t = p_t * (dp_t - delta[None, :])
            if BIAS_GRAD:
                tl.store(dbias_base + rows.to(tl.int64) * stride_dbm + cols * stride_dbn, ds_t,
                         mask=(rows < seqlen_q) & (cols < seqlen_k))
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, CuSeqlensQ, CuSeqlensK, Bias, DBias, Alibi,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn, stride_ab,
    nheads_k, group_size, max_seqlen_q, max_seqlen_k, diag_offset, window_left, window_right,
    softmax_scale, qk_scale, softcap_in, softcap_out, dropout_p, dropout_scale, seed,
    FullList, PartList, Patterns, sparse_sb, sparse_sh, full_row, part_row, tail_bh, SeqUsedK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
    IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DESC: tl.constexpr = False,
    SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1,
    PART: tl.constexpr = 0, HAS_SEQUSED: tl.constexpr = False,
):
    """Grid: (cdiv(max_seqlen_k, BLOCK_N) * batch * nheads_k,), the last ``tail_bh``
    (batch, kv head) pairs issued longest first (``program_tile``). Lse and Delta share strides.
    DBias (fp32, unbroadcast (batch, nheads, seqlen_q, seqlen_k)) receives dS when BIAS_GRAD.
    SPARSE: the lists are those of the forward kernel transposed (per key
    block, the query blocks of its full and partial tiles), one row per
    (batch, query head, key block).
    PART: 0 computes dK and dV; 1 dV alone, 2 dK alone (two launches with one
    accumulator each: at head dim 256 the two 64 x 256 fp32 accumulators of
    one launch leave too few registers). DK (PART 1) or DV (PART 2) is untouched."""
    pid_n, pid_bh = program_tile(max_seqlen_k, BLOCK_N, False, tail_bh)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    start_n = pid_n * BLOCK_N
    start_q, seqlen_q, start_k, seqlen_k, diag = _seq_bounds(CuSeqlensQ, CuSeqlensK, SeqUsedK, b, max_seqlen_q,
                                                             max_seqlen_k, diag_offset, IS_VARLEN, HAS_SEQUSED)
    if IS_VARLEN:
        if start_n >= seqlen_k:
            return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v_ok = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)

    k_off = b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_ks + hk * stride_kh
    v_off = b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vs + hk * stride_vh
    k = tl.load(K + k_off + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    # what a part does not compute stays a scalar placeholder (no registers)
    v, dk, dv = 0.0, 0.0, 0.0
    if PART != 1:
        v = tl.load(V + v_off + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=v_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if PART != 2:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if not SPARSE:
        lo, full_lo, full_hi, hi = query_ranges(start_n, seqlen_q, diag, window_left, window_right,
                                                BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT)
    else:
        k_blk = start_n // SPARSE_BN
    for g in range(0, group_size):
        h = hk * group_size + g
        q_ptrs = row_source(Q + b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qs + h * stride_qh,
                            offs_m, offs_d, stride_qs, seqlen_q, HEAD_DIM, BLOCK_M, BLOCK_D, USE_DESC)
        do_ptrs = row_source(DOut + b.to(tl.int64) * stride_dob + start_q.to(tl.int64) * stride_dos
                             + h * stride_doh, offs_m, offs_dv, stride_dos, seqlen_q, HEAD_DIM_V, BLOCK_M,
                             BLOCK_DV, USE_DESC)
        lse_ptr = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + start_q
        delta_ptr = Delta + b.to(tl.int64) * stride_lb + h * stride_lh + start_q
        bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
        dbias_base = DBias + b.to(tl.int64) * stride_dbb + h.to(tl.int64) * stride_dbh
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(Alibi + b * stride_ab + h)
        bh = b * (nheads_k * group_size) + h
        if SPARSE:
            list_row = b * sparse_sb + h * sparse_sh + k_blk
            for part in tl.static_range(2):
                # partial tiles (masked by their pattern), then full tiles
                if part == 0:
                    tile_list = PartList + list_row * part_row
                else:
                    tile_list = FullList + list_row * full_row
                dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                                     bias_base, stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn,
                                     offs_m, offs_n, offs_d, offs_dv, 0,
                                     tl.load(tile_list) * (SPARSE_BM // BLOCK_M),
                                     seqlen_q, seqlen_k, diag, window_left, window_right, qk_scale, softcap_in,
                                     softcap_out, alibi_slope, bh, max_seqlen_q, max_seqlen_k, dropout_p,
                                     dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_M, part == 0, MASK_LEFT, MASK_RIGHT,
                                     SOFTCAP, HAS_ALIBI, BIAS_KIND, BIAS_ROWS, BIAS_GRAD, DROPOUT, UPCAST,
                                     DOT_PRECISION, USE_DESC, tile_list + 1, Patterns, k_blk * SPARSE_BN,
                                     SPARSE, SPARSE_BM, SPARSE_BN, start_n, BLOCK_N, PART)
        else:
            for part in tl.static_range(3):
                # partial rows before the band's full part, the full part, partial rows after it
                if part == 0:
                    start, end = lo, full_lo
                elif part == 1:
                    start, end = full_lo, full_hi
                else:
                    start, end = full_hi, hi
                if (part != 2) or MASK_LEFT:
                    dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                                         bias_base, stride_bm, stride_bn, dbias_base, stride_dbm, stride_dbn,
                                         offs_m, offs_n, offs_d, offs_dv, start, end, seqlen_q, seqlen_k, diag,
                                         window_left, window_right, qk_scale, softcap_in, softcap_out, alibi_slope,
                                         bh, max_seqlen_q, max_seqlen_k, dropout_p, dropout_scale, seed,
                                         HEAD_DIM, HEAD_DIM_V, BLOCK_M, part != 1, MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI,
                                         BIAS_KIND, BIAS_ROWS, BIAS_GRAD, DROPOUT, UPCAST, DOT_PRECISION, USE_DESC,
                                         BLOCK_N=BLOCK_N, PART=PART)

    if PART != 1:
        dk = dk * softmax_scale
        tl.store(DK + b.to(tl.int64) * stride_dkb + start_k.to(tl.int64) * stride_dks + hk * stride_dkh
                 + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    if PART != 2:
        tl.store(DV + b.to(tl.int64) * stride_dvb + start_k.to(tl.int64) * stride_dvs + hk * stride_dvh
                 + offs_n[:, None] * stride_dvs + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _dq_scores_grad(p, t, dp, rows, cols, delta, bh, max_seqlen_q, max_seqlen_k, dropout_p, dropout_scale, seed,
                    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr):
    """dS from P and the raw products ``dp`` = dO V^T."""
    if DROPOUT:
        keep = dropout_keep(seed, bh, rows, cols, max_seqlen_q, max_seqlen_k, dropout_p)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
              bias_base, stride_bm, stride_bn, offs_m, offs_n, offs_d, offs_dv, start, end, seqlen_q, seqlen_k,
              diag, window_left, window_right, qk_scale, softcap_in, softcap_out, alibi_slope, bh, max_seqlen_q,
              max_seqlen_k, dropout_p, dropout_scale, seed,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr,
              DROPOUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DESC: tl.constexpr,
              tile_list=0, Patterns=0, row0=0,
              SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1):
    """Accumulate key tiles [start, end) into dq of the query rows ``offs_m``;
    ``k_ptrs`` / ``v_ptrs`` are ``row_source`` s. SPARSE: as in the forward pass."""
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    rows = offs_m[:, None]
    SUB: tl.constexpr = SPARSE_BN // BLOCK_N
    if SPARSE:
        nxt_blk, nxt_pattern = sparse_entry(tile_list, start // SUB, start < end, MASKED)
    for it in range(start, end, 1 if SPARSE else BLOCK_N):
        if SPARSE:
            pattern = nxt_pattern
            start_n, col0, nxt_blk, nxt_pattern = sparse_step(tile_list, it, end, nxt_blk, SUB, SPARSE_BN, BLOCK_N,
                                                              MASKED)
        else:
            start_n, col0, pattern = it, 0, 0
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols_1d = start_n + offs_n
        cols = cols_1d[None, :]
        k = load_rows(k_ptrs, start_n, stride_ks, cols_1d, seqlen_k, d_ok, USE_DESC)
        v = load_rows(v_ptrs, start_n, stride_vs, cols_1d, seqlen_k, dv_ok, USE_DESC)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p, t, allowed = _tile_probs(qk, rows, cols, lse[:, None], seqlen_q, seqlen_k, diag, window_left, window_right,
                           qk_scale, softcap_in, softcap_out, alibi_slope, bias_base, stride_bm, stride_bn, Patterns,
                           pattern, row0, col0, start_n, BLOCK_N, MASKED, MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI,
                           BIAS_KIND, BIAS_ROWS, SPARSE, SPARSE_BM, SPARSE_BN)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = _dq_scores_grad(p, t, dp, rows, cols, delta, bh, max_seqlen_q, max_seqlen_k, dropout_p, dropout_scale,
                             seed, SOFTCAP, DROPOUT)
        if MASKED:
            # keys a row does not see add nothing to its dQ, NaN and Inf in their K and V included
            ds = tl.where(allowed, ds, 0.0)
            dq = masked_pv(dq, ds, k, allowed, DOT_PRECISION)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_rows(Q, DOut, Out, Lse, Delta, q_off, do_off, o_off, lse_off, offs_m, offs_d, offs_dv, stride_qs, stride_dos,
             stride_os, seqlen_q, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, UPCAST: tl.constexpr):
    """Q, dO, the base-2 LSE and delta = rowsum(dO * O) of the query rows ``offs_m``;
    delta is also written (Lse's layout) for the dK/dV kernel."""
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    ok_v = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qs + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + do_off + offs_m[:, None] * stride_dos + offs_dv[None, :], mask=ok_v, other=0.0)
    o = tl.load(Out + o_off + offs_m[:, None] * stride_os + offs_dv[None, :], mask=ok_v, other=0.0)
    # delta_i = sum_d dO_id O_id (= rowsum(P * dP)), for dS here and in the dK/dV kernel
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + lse_off + offs_m, delta, mask=offs_m < seqlen_q)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q, do, _load_lse_log2(Lse + lse_off, offs_m, seqlen_q), delta


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DOut, Out, DQ, Lse, Delta, CuSeqlensQ, CuSeqlensK, Bias, Alibi,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_ob, stride_os, stride_oh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ab,
    nheads, group_size, max_seqlen_q, max_seqlen_k, diag_offset, window_left, window_right,
    softmax_scale, qk_scale, softcap_in, softcap_out, dropout_p, dropout_scale, seed,
    FullList, PartList, Patterns, sparse_sb, sparse_sh, full_row, part_row, tail_bh, SeqUsedK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BIAS_KIND: tl.constexpr, BIAS_ROWS: tl.constexpr, DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DESC: tl.constexpr = False,
    SPARSE: tl.constexpr = False, SPARSE_BM: tl.constexpr = 1, SPARSE_BN: tl.constexpr = 1,
    HAS_SEQUSED: tl.constexpr = False,
):
    """Grid: (cdiv(max_seqlen_q, BLOCK_M) * batch * nheads,), the last ``tail_bh``
    (batch, head) pairs issued longest first (``program_tile``). With USE_DESC, K/V
    tiles are read through tensor descriptors (as the dK/dV kernel reads Q/dO).
    SPARSE: the forward kernel's tile lists. Writes Delta (fp32, Lse's layout)
    of its rows, which the dK/dV kernel reads."""
    pid_m, pid_bh = program_tile(max_seqlen_q, BLOCK_M, MASK_RIGHT and not MASK_LEFT, tail_bh)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group_size
    start_m = pid_m * BLOCK_M
    start_q, seqlen_q, start_k, seqlen_k, diag = _seq_bounds(CuSeqlensQ, CuSeqlensK, SeqUsedK, b, max_seqlen_q,
                                                             max_seqlen_k, diag_offset, IS_VARLEN, HAS_SEQUSED)
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_off = b.to(tl.int64) * stride_qb + start_q.to(tl.int64) * stride_qs + h * stride_qh
    do_off = b.to(tl.int64) * stride_dob + start_q.to(tl.int64) * stride_dos + h * stride_doh
    o_off = b.to(tl.int64) * stride_ob + start_q.to(tl.int64) * stride_os + h * stride_oh
    lse_off = b.to(tl.int64) * stride_lb + h * stride_lh + start_q
    q, do, lse, delta = _dq_rows(Q, DOut, Out, Lse, Delta, q_off, do_off, o_off, lse_off, offs_m, offs_d, offs_dv,
                                 stride_qs, stride_dos, stride_os, seqlen_q, HEAD_DIM, HEAD_DIM_V, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_ptrs = row_source(K + b.to(tl.int64) * stride_kb + start_k.to(tl.int64) * stride_ks + hk * stride_kh,
                        offs_n, offs_d, stride_ks, seqlen_k, HEAD_DIM, BLOCK_N, BLOCK_D, USE_DESC)
    v_ptrs = row_source(V + b.to(tl.int64) * stride_vb + start_k.to(tl.int64) * stride_vs + hk * stride_vh,
                        offs_n, offs_dv, stride_vs, seqlen_k, HEAD_DIM_V, BLOCK_N, BLOCK_DV, USE_DESC)
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(Alibi + b * stride_ab + h)

    bh = b * nheads + h
    if SPARSE:
        q_blk = start_m // SPARSE_BM
        list_row = b * sparse_sb + h * sparse_sh + q_blk
        for part in tl.static_range(2):
            # partial tiles (masked by their pattern), then full tiles
            if part == 0:
                tile_list = PartList + list_row * part_row
            else:
                tile_list = FullList + list_row * full_row
            dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks,
                           stride_vs, bias_base, stride_bm, stride_bn, offs_m, offs_n, offs_d, offs_dv, 0,
                           tl.load(tile_list) * (SPARSE_BN // BLOCK_N), seqlen_q, seqlen_k, diag, window_left,
                           window_right, qk_scale, softcap_in, softcap_out, alibi_slope, bh, max_seqlen_q,
                           max_seqlen_k, dropout_p, dropout_scale, seed,
                           HEAD_DIM, HEAD_DIM_V, BLOCK_N, part == 0, MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI,
                           BIAS_KIND, BIAS_ROWS, DROPOUT, UPCAST, DOT_PRECISION, USE_DESC,
                           tile_list + 1, Patterns, q_blk * SPARSE_BM, SPARSE, SPARSE_BM, SPARSE_BN)
    else:
        lo, full_lo, full_hi, hi = key_ranges(start_m, seqlen_k, diag, window_left, window_right,
                                              BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT)
        for part in tl.static_range(3):
            if part == 0:
                start, end = lo, full_lo
            elif part == 1:
                start, end = full_lo, full_hi
            else:
                start, end = full_hi, hi
            if (part != 0) or MASK_LEFT:
                dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs,
                               stride_ks, stride_vs, bias_base, stride_bm, stride_bn, offs_m, offs_n,
                               offs_d, offs_dv, start, end, seqlen_q, seqlen_k, diag, window_left, window_right,
                               qk_scale, softcap_in, softcap_out, alibi_slope, bh, max_seqlen_q, max_seqlen_k,
                               dropout_p, dropout_scale, seed,
                               HEAD_DIM, HEAD_DIM_V, BLOCK_N, part != 1, MASK_LEFT, MASK_RIGHT, SOFTCAP, HAS_ALIBI,
                               BIAS_KIND, BIAS_ROWS, DROPOUT, UPCAST, DOT_PRECISION, USE_DESC)

    dq_base = DQ + b.to(tl.int64) * stride_dqb + start_q.to(tl.int64) * stride_dqs + h * stride_dqh
    d_ok = offs_d[None, :] < HEAD_DIM
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & d_ok)
