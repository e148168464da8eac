"""FlashAttention backward kernels.

Three launches, no atomics (so gradients are bitwise deterministic):

1. ``attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` per query row.
2. ``attn_bwd_dkdv_kernel``: one program owns BLOCK_N keys of one kv head;
   it keeps K, V, dK, dV on chip and loops over every query head of its
   group and over the query blocks that see those keys, recomputing
   ``P = exp(QK^T * scale - LSE)`` from the saved LSE. dK/dV of a GQA group
   are therefore summed in registers.
3. ``attn_bwd_dq_kernel``: one program owns BLOCK_M query rows of one head
   and loops over key blocks, as the forward pass does.
"""

import triton
import triton.language as tl

from .common import key_ranges, program_tile, query_ranges, tile_mask

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attn_bwd_preprocess_kernel(
    Out, DOut, Delta,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_db, stride_dh,
    nheads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid: (cdiv(seqlen_q, BLOCK_M) * batch * nheads,). Delta: (batch, nheads, seqlen_q) fp32."""
    pid_m, pid_bh = program_tile(seqlen_q, BLOCK_M, False)
    b = pid_bh // nheads
    h = pid_bh % nheads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(Delta + b.to(tl.int64) * stride_db + h * stride_dh + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse_log2(Lse, offs, seqlen_q):
    """LSE in base 2. Rows that saw no key (LSE = -inf) get +inf so that P = 0."""
    lse = tl.load(Lse + offs, mask=offs < seqlen_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * LOG2E


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                offs_m, offs_n, offs_d, start, end, seqlen_q, seqlen_k, causal_offset, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Accumulate query tiles [start, end) into dK^T-free (dk, dv) for one key block."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        ok = (rows[:, None] < seqlen_q) & d_ok
        q = tl.load(q_ptrs + start_m * stride_qs, mask=ok, other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dos, mask=ok, other=0.0)
        lse = _load_lse_log2(lse_ptr, rows, seqlen_q)
        delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # transposed scores: [BLOCK_N, BLOCK_M]
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            mask = tile_mask(rows, offs_n, seqlen_k, causal_offset, IS_CAUSAL)
            p_t = tl.where(tl.trans(mask), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    nheads_k, group_size, seqlen_q, seqlen_k, causal_offset, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(seqlen_k, BLOCK_N) * batch * nheads_k,). Lse and Delta share strides."""
    pid_n, pid_bh = program_tile(seqlen_k, BLOCK_N, False)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(K + b.to(tl.int64) * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    begin, full_begin = query_ranges(start_n, seqlen_q, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for g in range(0, group_size):
        h = hk * group_size + g
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = DOut + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :]
        lse_ptr = Lse + b.to(tl.int64) * stride_lb + h * stride_lh
        delta_ptr = Delta + b.to(tl.int64) * stride_lb + h * stride_lh
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                             offs_m, offs_n, offs_d, begin, full_begin, seqlen_q, seqlen_k, causal_offset,
                             qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, IS_CAUSAL, UPCAST, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs, stride_dos,
                             offs_m, offs_n, offs_d, full_begin, seqlen_q, seqlen_q, seqlen_k, causal_offset,
                             qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, IS_CAUSAL, UPCAST, DOT_PRECISION)

    dk = dk * softmax_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
              offs_m, offs_n, offs_d, start, end, seqlen_k, causal_offset, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Accumulate key tiles [start, end) into dq for one query block."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        ok = (cols[:, None] < seqlen_k) & d_ok
        k = tl.load(k_ptrs + start_n * stride_ks, mask=ok, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vs, mask=ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(tile_mask(offs_m, cols, seqlen_k, causal_offset, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    nheads, group_size, seqlen_q, seqlen_k, causal_offset, softmax_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(seqlen_q, BLOCK_M) * batch * nheads,)."""
    pid_m, pid_bh = program_tile(seqlen_q, BLOCK_M, IS_CAUSAL)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group_size
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = _load_lse_log2(Lse + b.to(tl.int64) * stride_lb + h * stride_lh, offs_m, seqlen_q)
    delta = tl.load(Delta + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m, mask=offs_m < seqlen_q, other=0.0)

    k_ptrs = K + b.to(tl.int64) * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b.to(tl.int64) * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = key_ranges(start_m, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
                   offs_m, offs_n, offs_d, 0, full_end, seqlen_k, causal_offset, qk_scale,
                   HEAD_DIM, BLOCK_N, False, IS_CAUSAL, UPCAST, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs,
                   offs_m, offs_n, offs_d, full_end, end, seqlen_k, causal_offset, qk_scale,
                   HEAD_DIM, BLOCK_N, True, IS_CAUSAL, UPCAST, DOT_PRECISION)

    dq = dq * softmax_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ok)
