"""dK and dV of FlashAttention's backward for Hopper (sm90) in Triton's Gluon
dialect: the heavier half of the backward (four of its seven matmuls), beside
the Triton dQ kernel, which also writes ``delta = rowsum(dO * O)``.

Contract: q, k, v, dO of shape (batch, seqlen, nheads, headdim) with a
contiguous last dimension (other strides free), GQA (query head ``h`` reads
key/value head ``h // group``), bf16 / fp16, full attention or causal
(bottom-right, ``diag`` given); the natural-log LSE and delta (batch, nheads,
seqlen_q) in fp32 with a contiguous last dimension. dK and dV are written in
k's dtype; rows past seqlen_k are not written.

``gluon_bwd_dkdv_ws`` (full attention) is the same warp-specialised: a producer
warp streams the Q/dO tiles, and each of two consumer warpgroups owns 64 of the
block's keys (tested on an H100; 0.83-0.96x the Triton backward there).

One program per (BLOCK_N-key block, batch, key/value head), 8 warps: the two
warpgroups own 64 keys each (the wgmma layout splits the block's rows between
them). K and V stay in shared memory; Q and dO tiles of BLOCK_M query rows of
each query head of the group in turn stream through a ring of STAGES buffers
by TMA, refilled once a tile's matmuls have retired. Per tile, with scores transposed (keys as rows):

    S^T = K Q^T,  P^T = exp2(S^T * qk_scale - lse * log2 e)
    dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),  dK += dS^T Q

P^T and dS^T are fed to the second products from registers. Query rows past
seqlen_q read as zeros and take LSE +inf (P = 0): they add nothing.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .gluon_forward import _count_bad, _sanitize, _slice_descriptor

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _group_descriptor(base, b, hk, group, stride_b, stride_s, stride_h, seqlen, BLOCK: gl.constexpr,
                      HEAD_D: gl.constexpr):
    """TMA descriptor over the [group, seqlen, HEAD_D] rows of the ``group`` query heads
    of key/value head ``hk`` (batch ``b``); its [1, BLOCK, HEAD_D] boxes land in
    [BLOCK, HEAD_D] buffers of the same swizzle (``_landing``)."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
    ptr = base + b.to(gl.int64) * stride_b + (hk * group).to(gl.int64) * stride_h
    return tma.make_tensor_descriptor(ptr, shape=[group, seqlen, HEAD_D], strides=[stride_h, stride_s, 1],
                                      block_shape=[1, BLOCK, HEAD_D], layout=layout)


@gluon.jit
def _landing(desc, buffer, GQA: gl.constexpr):
    """``buffer`` as the destination of one of ``desc``'s boxes (a unit leading dim with GQA)."""
    if GQA:
        return buffer._reinterpret(buffer.dtype, desc.block_type.shape, desc.layout)
    else:
        return buffer


@gluon.jit
def _step_tile(it, n_masked, first, full, count, CAUSAL: gl.constexpr):
    """(query head of the group, query tile) of step ``it``: the masked tiles
    ``first .. full - 1`` of every head, then the unmasked ones ``full .. count - 1``
    (without CAUSAL, all ``count`` tiles of every head)."""
    if CAUSAL:
        # (at least 1: a branch without steps may still be evaluated)
        masked_per_head = gl.maximum(full - first, 1)
        unmasked_per_head = gl.maximum(count - full, 1)
        if it < n_masked:
            head = it // masked_per_head
            tile = first + it % masked_per_head
        else:
            j = it - n_masked
            head = j // unmasked_per_head
            tile = full + j % unmasked_per_head
    else:
        head = it // count
        tile = it % count
    return head, tile


@gluon.jit
def _load_q_do(q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, it, n_masked, first, full, count, pred,
               BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GQA: gl.constexpr, CAUSAL: gl.constexpr):
    """TMA loads of the Q and dO tiles of step ``it`` (``_step_tile``) into stage
    ``it % STAGES`` (skipped when not ``pred``)."""
    st = it % STAGES
    head, tile = _step_tile(it, n_masked, first, full, count, CAUSAL)
    if GQA:
        at = [head, tile * BLOCK_M, 0]
    else:
        at = [tile * BLOCK_M, 0]
    mbarrier.expect(q_bars.index(st), q_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_desc, at, q_bars.index(st), _landing(q_desc, q_smem.index(st), GQA), pred=pred)
    mbarrier.expect(do_bars.index(st), do_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(do_desc, at, do_bars.index(st), _landing(do_desc, do_smem.index(st), GQA),
                                    pred=pred)


@gluon.jit
def _query_tiles(start_n, seqlen_q, diag, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(first, full, count): the query tiles that see a key of the block [start_n, +BLOCK_N)
    are ``first .. count - 1``; from ``full`` on (``first <= full <= count``), every row
    sees every key of it."""
    count = gl.cdiv(seqlen_q, BLOCK_M)
    if CAUSAL:
        # query m sees key j <= m + diag
        first = gl.minimum(gl.maximum(start_n - diag, 0) // BLOCK_M, count)
        full = gl.minimum(gl.maximum(gl.cdiv(gl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M), first), count)
    else:
        first = 0
        full = 0
    return first, full, count


@gluon.jit
def _nan_marks(allowed, bad_tile, acc, a_layout: gl.constexpr):
    """``acc`` with NaN where a key sees (``allowed``, keys x queries) a query row whose
    element in that column was non-finite (``bad_tile``: 0 / 1, queries x HEAD_D)."""
    hits = warpgroup_mma(gl.convert_layout(allowed.to(bad_tile.dtype), a_layout), bad_tile, gl.zeros_like(acc),
                         use_acc=False, is_async=True)
    hits = warpgroup_mma_wait(num_outstanding=0, deps=(hits, ))
    return gl.where(hits > 0, float("nan"), acc)


@gluon.jit
def _program_operands(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, stride_qb, stride_qs, stride_qh, stride_kb,
                      stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                      stride_lb, stride_lh, nheads_k, group, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, GQA: gl.constexpr):
    """This program's key block, batch and key/value head, the descriptors of its Q/dO
    tiles (over the group's query heads with GQA) and K/V block, and its LSE and delta
    rows (those of the group's first query head)."""
    start_n = gl.program_id(0) * BLOCK_N
    bh = gl.program_id(1)
    b = bh // nheads_k
    hk = bh % nheads_k
    if GQA:
        q_desc = _group_descriptor(q_ptr, b, hk, group, stride_qb, stride_qs, stride_qh, seqlen_q, BLOCK_M, HEAD_D)
        do_desc = _group_descriptor(do_ptr, b, hk, group, stride_dob, stride_dos, stride_doh, seqlen_q, BLOCK_M,
                                    HEAD_D)
    else:
        q_desc = _slice_descriptor(q_ptr, b, hk, stride_qb, stride_qs, stride_qh, seqlen_q, BLOCK_M, HEAD_D)
        do_desc = _slice_descriptor(do_ptr, b, hk, stride_dob, stride_dos, stride_doh, seqlen_q, BLOCK_M, HEAD_D)
    k_desc = _slice_descriptor(k_ptr, b, hk, stride_kb, stride_ks, stride_kh, seqlen_k, BLOCK_N, HEAD_D)
    v_desc = _slice_descriptor(v_ptr, b, hk, stride_vb, stride_vs, stride_vh, seqlen_k, BLOCK_N, HEAD_D)
    head_rows = b.to(gl.int64) * stride_lb + (hk * group).to(gl.int64) * stride_lh
    return start_n, b, hk, q_desc, do_desc, k_desc, v_desc, lse_ptr + head_rows, delta_ptr + head_rows


@gluon.jit
def _dkdv_step(it, dk, dv, k_smem, v_smem, q_smem, do_smem, bad_smem, q_bars, do_bars, q_desc, do_desc, lse_rows,
               delta_rows, stride_lh, keys, st_zero, n_masked, first, full, count, n_steps, seqlen_q, diag, qk_scale,
               BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GQA: gl.constexpr, CAUSAL: gl.constexpr,
               MASKED: gl.constexpr, a_layout: gl.constexpr, col_layout: gl.constexpr, rows_layout: gl.constexpr):
    """Step ``it``: one Q/dO tile against the block's keys; MASKED for a causal tile whose
    rows do not all see every key (NaN-safe). Returns (dk, dv)."""
    dtype: gl.constexpr = q_smem.dtype
    st = it % STAGES
    phase = (it // STAGES) & 1
    head, tile = _step_tile(it, n_masked, first, full, count, CAUSAL)
    rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
    in_range = rows < seqlen_q
    head_rows = head.to(gl.int64) * stride_lh
    # rows past seqlen_q: LSE +inf, so that P = 0 there
    lse2 = gl.load(lse_rows + head_rows + rows, mask=in_range, other=float("inf")) * LOG2E
    delta = gl.load(delta_rows + head_rows + rows, mask=in_range, other=0.0)
    q_tile = q_smem.index(st)
    do_tile = do_smem.index(st)
    # the two products of shared-memory operands first, in flight together
    mbarrier.wait(q_bars.index(st), phase)
    s = warpgroup_mma(k_smem, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    mbarrier.wait(do_bars.index(st), phase)
    dp = warpgroup_mma(v_smem, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
    n_bad = 0
    if MASKED:
        # a query row's NaN or Inf (in q, dO, or delta through O) must not reach the keys it
        # does not see through 0 * NaN in dS or in dV += P^T dO and dK += dS^T Q; counted
        # here, rarely non-zero
        n_bad = _count_bad(q_tile, 32, BLOCK_M, rows_layout) + _count_bad(do_tile, 32, BLOCK_M, rows_layout)
        n_bad += gl.sum(((delta != delta) | (gl.abs(delta) == float("inf"))).to(gl.int32), axis=0)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if MASKED:
        p = gl.where(keys[:, None] <= rows[None, :] + diag, p, 0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
    # masked positions: P = 0 and dP - delta finite (unless n_bad), so dS = 0 there
    ds = p * (dp - delta[None, :])
    if n_bad > 0:
        ds = gl.where(keys[:, None] <= rows[None, :] + diag, ds, 0.0)
        # both warpgroups are done with the raw tiles: zero their non-finite values in place
        # and keep where they were
        gl.thread_barrier()
        _sanitize(q_tile, bad_smem.index(0), 32, BLOCK_M, rows_layout)
        _sanitize(do_tile, bad_smem.index(1), 32, BLOCK_M, rows_layout)
        gl.thread_barrier()
    # then the two accumulating products, P^T and dS^T from registers
    dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_tile, dv, is_async=True)
    dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), q_tile, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
    if n_bad > 0:
        # a key that sees a non-finite dO value gets NaN in that column of dV, as the raw
        # product would have given it. dK needs no marks: a row with a non-finite q or dO
        # value has NaN scores or dP, so dS is NaN wherever it is seen, which reaches
        # every column of dK through dS^T Q
        dv = _nan_marks(keys[:, None] <= rows[None, :] + diag, bad_smem.index(1), dv, a_layout)
    # every matmul that read stage st has retired: refill it
    _load_q_do(q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, it + STAGES, n_masked, first, full, count,
               it + STAGES < n_steps, BLOCK_M, STAGES, GQA, CAUSAL)
    return dk, dv


@gluon.jit
def gluon_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, stride_qb, stride_qs, stride_qh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos,
                   stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_lb,
                   stride_lh, nheads_k, group, seqlen_q, seqlen_k, diag, softmax_scale, qk_scale,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                   GQA: gl.constexpr, CAUSAL: gl.constexpr, NUM_WARPS: gl.constexpr):
    """One program per (key block, batch, key/value head): dK and dV of its keys, summed
    over the ``group`` query heads that read them (GQA: one descriptor over the group's
    heads; else group is 1). CAUSAL: query ``i`` sees keys ``j <= i + diag``; the query
    tiles before the block's first reader are skipped, and masked tiles are NaN-safe."""
    start_n, b, hk, q_desc, do_desc, k_desc, v_desc, lse_rows, delta_rows = _program_operands(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
        stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
        nheads_k, group, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, HEAD_D, GQA)
    dtype: gl.constexpr = q_desc.dtype

    # scores transposed: BLOCK_N keys x BLOCK_M queries; dK / dV: BLOCK_N keys x HEAD_D
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                         instr_shape=[16, HEAD_D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], v_desc.layout)
    # Q and dO tiles as [BLOCK_M, HEAD_D] operands, in K's swizzle
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], k_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], k_desc.layout)
    # where a causal masked step's Q and dO had non-finite values (see below)
    bad_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_D], k_desc.layout)
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(do_bars.index(i), count=1)

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [start_n, 0], kv_bar, v_smem)
    first, full, count = _query_tiles(start_n, seqlen_q, diag, BLOCK_M, BLOCK_N, CAUSAL)
    # steps: (query head of the group, query tile), see _step_tile; none: dK = dV = 0
    n_masked = (full - first) * group
    n_steps = (count - first) * group
    for i in gl.static_range(STAGES):
        _load_q_do(q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, i, n_masked, first, full, count, i < n_steps,
                   BLOCK_M, STAGES, GQA, CAUSAL)
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))

    dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=acc_layout)
    st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
    mbarrier.wait(kv_bar, 0)

    # the masked steps (causal tiles on the diagonal), then the rest: one loop each, so that
    # the NaN-safe work of the first costs the second no registers
    if CAUSAL:
        for it in range(n_masked):
            dk, dv = _dkdv_step(it, dk, dv, k_smem, v_smem, q_smem, do_smem, bad_smem, q_bars, do_bars, q_desc,
                                do_desc, lse_rows, delta_rows, stride_lh, keys, st_zero, n_masked, first, full, count,
                                n_steps, seqlen_q, diag, qk_scale, BLOCK_M, STAGES, GQA, CAUSAL, True, a_layout,
                                col_layout, rows_layout)
    for it in range(n_masked, n_steps):
        dk, dv = _dkdv_step(it, dk, dv, k_smem, v_smem, q_smem, do_smem, bad_smem, q_bars, do_bars, q_desc, do_desc,
                            lse_rows, delta_rows, stride_lh, keys, st_zero, n_masked, first, full, count, n_steps,
                            seqlen_q, diag, qk_scale, BLOCK_M, STAGES, GQA, CAUSAL, False, a_layout, col_layout,
                            rows_layout)

    # dS is the gradient of the scaled scores: dK takes the softmax scale once, here
    dk = dk * softmax_scale
    # (made here: nothing of theirs is live during the loops)
    dk_desc = _slice_descriptor(dk_ptr, b, hk, stride_dkb, stride_dks, stride_dkh, seqlen_k, BLOCK_N, HEAD_D)
    dv_desc = _slice_descriptor(dv_ptr, b, hk, stride_dvb, stride_dvs, stride_dvh, seqlen_k, BLOCK_N, HEAD_D)
    # K and V are done with: their buffers stage the results for the TMA stores (rows past
    # seqlen_k are clipped)
    k_smem.store(dk.to(dtype))
    v_smem.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [start_n, 0], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [start_n, 0], v_smem)
    tma.store_wait(0)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_bars.index(i))
        mbarrier.invalidate(do_bars.index(i))


# --- warp-specialised form (full attention): a producer warp streams the Q/dO tiles, two
# consumer warpgroups own 64 keys each ---

@gluon.jit
def _ws_bwd_producer(q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, empty_bars, n_steps, count,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GQA: gl.constexpr):
    """Producer partition: the Q and dO tiles of step ``it`` into stage ``it % STAGES`` once
    both consumers have released that stage's previous tiles."""
    for it in range(n_steps):
        st = it % STAGES
        # a fresh barrier counts as having completed the phase before phase 0
        mbarrier.wait(empty_bars.index(st), ((it // STAGES) & 1) ^ 1)
        _load_q_do(q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, it, 0, 0, 0, count, True, BLOCK_M, STAGES, GQA,
                   False)


@gluon.jit
def _ws_bwd_consumer(k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars, do_bars, empty_bars, dk_desc, dv_desc, lse_rows,
                     delta_rows, stride_lh, start_n, n_steps, count, seqlen_q, softmax_scale, qk_scale,
                     WG: gl.constexpr, ROWS: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr,
                     STAGES: gl.constexpr):
    """Consumer warpgroup ``WG``: dK and dV of the keys [start_n + WG * ROWS, + ROWS)
    against every Q/dO tile (the products of ``_dkdv_step``, full attention)."""
    dtype: gl.constexpr = k_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    k_rows = k_smem.slice(WG * ROWS, ROWS, dim=0)
    v_rows = v_smem.slice(WG * ROWS, ROWS, dim=0)
    dk = gl.zeros([ROWS, HEAD_D], gl.float32, layout=acc_layout)
    dv = gl.zeros([ROWS, HEAD_D], gl.float32, layout=acc_layout)
    st_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=st_layout)
    mbarrier.wait(kv_bar, 0)
    for it in range(n_steps):
        st = it % STAGES
        phase = (it // STAGES) & 1
        rows = (it % count) * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
        in_range = rows < seqlen_q
        head_rows = (it // count).to(gl.int64) * stride_lh
        lse2 = gl.load(lse_rows + head_rows + rows, mask=in_range, other=float("inf")) * LOG2E
        delta = gl.load(delta_rows + head_rows + rows, mask=in_range, other=0.0)
        q_tile = q_smem.index(st)
        do_tile = do_smem.index(st)
        mbarrier.wait(q_bars.index(st), phase)
        s = warpgroup_mma(k_rows, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_bars.index(st), phase)
        dp = warpgroup_mma(v_rows, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        p = gl.exp2(s * qk_scale - lse2[None, :])
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
        ds = p * (dp - delta[None, :])
        dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_tile, dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), q_tile, dk, is_async=True)
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(empty_bars.index(st), count=1)
    dk = dk * softmax_scale
    # this warpgroup's rows of K and V stage its results (rows past seqlen_k are clipped)
    k_rows.store(dk.to(dtype))
    v_rows.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [start_n + WG * ROWS, 0], k_rows)
    tma.async_copy_shared_to_global(dv_desc, [start_n + WG * ROWS, 0], v_rows)
    tma.store_wait(0)


@gluon.jit
def gluon_bwd_dkdv_ws(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, stride_qb, stride_qs,
                      stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_dob,
                      stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                      stride_lb, stride_lh, nheads_k, group, seqlen_q, seqlen_k, softmax_scale, qk_scale,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                      GQA: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """``gluon_bwd_dkdv`` (full attention) warp-specialised: run with num_warps=4 (consumer
    warpgroup 0, the default partition); a worker warpgroup is consumer 1, a one-warp
    worker the producer. K and V are loaded once before the partitions start."""
    ROWS: gl.constexpr = BLOCK_N // 2
    start_n, b, hk, q_desc, do_desc, k_desc, v_desc, lse_rows, delta_rows = _program_operands(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
        stride_kh, stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh, stride_lb, stride_lh,
        nheads_k, group, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, HEAD_D, GQA)
    dk_desc = _slice_descriptor(dk_ptr, b, hk, stride_dkb, stride_dks, stride_dkh, seqlen_k, ROWS, HEAD_D)
    dv_desc = _slice_descriptor(dv_ptr, b, hk, stride_dvb, stride_dvs, stride_dvh, seqlen_k, ROWS, HEAD_D)
    dtype: gl.constexpr = k_desc.dtype

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], k_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], k_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(do_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)  # one arrive per consumer warpgroup
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [start_n, 0], kv_bar, v_smem)
    count = gl.cdiv(seqlen_q, BLOCK_M)
    n_steps = count * group

    gl.warp_specialize([
        (_ws_bwd_consumer, (k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars, do_bars, empty_bars, dk_desc, dv_desc,
                            lse_rows, delta_rows, stride_lh, start_n, n_steps, count, seqlen_q, softmax_scale,
                            qk_scale, 0, ROWS, BLOCK_M, HEAD_D, STAGES)),
        (_ws_bwd_consumer, (k_smem, v_smem, q_smem, do_smem, kv_bar, q_bars, do_bars, empty_bars, dk_desc, dv_desc,
                            lse_rows, delta_rows, stride_lh, start_n, n_steps, count, seqlen_q, softmax_scale,
                            qk_scale, 1, ROWS, BLOCK_M, HEAD_D, STAGES)),
        (_ws_bwd_producer, (q_desc, do_desc, q_smem, do_smem, q_bars, do_bars, empty_bars, n_steps, count, BLOCK_M,
                            STAGES, GQA)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
