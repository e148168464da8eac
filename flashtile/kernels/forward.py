"""FlashAttention forward kernel (FlashAttention-2 schedule).

One program owns BLOCK_M query rows of one (batch, head). Key/value tiles of
BLOCK_N rows stream past it; a running row max ``m`` and row sum ``l`` (online
softmax, base 2 with ``log2(e)`` folded into the scale) rescale the partial
output, which is normalised once at the end. Only the output and the
natural-log LSE per row are written.
"""

import triton
import triton.language as tl

from .common import key_ranges, program_tile, tile_mask

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs,
               offs_m, offs_n, offs_d, start, end, seqlen_k, causal_offset, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Accumulate key tiles [start, end) into (acc, l_i, m_i).

    ``k_src``/``v_src`` are tensor descriptors when USE_TMA (out-of-range rows
    and columns read as zero), else pointer blocks at key row 0.
    """
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kv_rows = start_n + offs_n
        if USE_TMA:
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        elif HEAD_DIM == BLOCK_D and not MASKED:
            k = tl.load(k_src + start_n * stride_ks)
            v = tl.load(v_src + start_n * stride_vs)
        else:
            kv_ok = d_ok
            if MASKED:
                kv_ok = (kv_rows[:, None] < seqlen_k) & d_ok
            k = tl.load(k_src + start_n * stride_ks, mask=kv_ok, other=0.0)
            v = tl.load(v_src + start_n * stride_vs, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(tile_mask(offs_m, kv_rows, seqlen_k, causal_offset, IS_CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf; subtract 0 instead
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    nheads, group_size, seqlen_q, seqlen_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    """Grid: (cdiv(seqlen_q, BLOCK_M) * batch * nheads,).

    Q, Out: (batch, seqlen_q, nheads, HEAD_DIM); K, V: (batch, seqlen_k,
    nheads // group_size, HEAD_DIM), last dim contiguous, other strides free.
    Lse: (batch, nheads, seqlen_q) fp32, natural log. ``qk_scale`` is
    softmax_scale * log2(e).
    """
    pid_m, pid_bh = program_tile(seqlen_q, BLOCK_M, IS_CAUSAL)
    b = pid_bh // nheads
    h = pid_bh % nheads
    hk = h // group_size
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_m[:, None] < seqlen_q

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
    if USE_TMA:
        # bulk tensor copies of [BLOCK_N, BLOCK_D] tiles; bounds give zero fill
        k_src = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_ks, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vs, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_src = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_src = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]

    q = tl.load(q_ptrs, mask=row_ok & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, end = key_ranges(start_m, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, 0, full_end, seqlen_k, causal_offset, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, UPCAST, DOT_PRECISION,
                               USE_TMA, WARP_SPECIALIZE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs,
                               offs_m, offs_n, offs_d, full_end, end, seqlen_k, causal_offset, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, UPCAST, DOT_PRECISION,
                               USE_TMA, False)

    # rows that saw no key: output 0, LSE -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(seen, m_i * LN2 + tl.log(l_safe), float("-inf"))

    o_ptrs = Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok & d_ok)
    lse_ptrs = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
