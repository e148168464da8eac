"""FlashAttention forward for Hopper (sm90) in Triton's Gluon dialect
(FlashAttention-3 structure). Taken by default where it measured faster than
the Triton forward (``launch/gluon.py`` says where).

Same contract as the Triton forward (``forward.py``): q, k, v of shape
(batch, seqlen, nheads, headdim) with a contiguous last dimension (other
strides free), GQA (query head ``h`` reads key/value head ``h // group``),
bf16 / fp16, online softmax in base 2 with ``log2(e)`` folded into the
scale; the output in q's dtype and the natural-log LSE (batch, nheads,
seqlen_q) in fp32. Causal masking is flash_attn's bottom-right alignment:
query ``i`` sees keys ``j <= i + diag`` with ``diag = seqlen_k - seqlen_q``
(passed in). Rows that see no key get output 0 and LSE -inf.

Tiles move by TMA through tensor descriptors built in the kernel over one
(batch, head) slice ``[seqlen, headdim]`` (strides free, rows past the end
read as zero and are not written), so the host needs a scratch allocator
(``triton.set_allocator``) for them.

Two kernels:

* ``gluon_fwd_simple``: one partition of NUM_WARPS warps (8: two warpgroups
  sharing one 128-row query block); K/V tiles in a ring of STAGES buffers that
  the same warps refill with TMA as soon as a tile's matmuls have retired;
  ``warpgroup_mma`` (async) for QK^T and PV.
* ``gluon_fwd_ws``: warp-specialised. A producer partition (1 warp, few
  registers) streams K/V tiles into the ring, and two consumer warpgroups
  (the default partition and one worker, many registers) each own 64 of the
  block's 128 query rows; every K/V stage is released when both consumers
  have arrived on its ``empty`` barrier. With PINGPONG the consumers take
  turns issuing their matmuls (an mbarrier handshake per K/V tile) so that
  one's softmax runs while the other's matmuls occupy the tensor cores.
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

LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _slice_descriptor(base, b, h, stride_b, stride_s, stride_h, seqlen, BLOCK: gl.constexpr,
                      HEAD_D: gl.constexpr):
    """TMA descriptor over the [seqlen, HEAD_D] rows of (batch b, head h)."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ptr = base + b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h
    return tma.make_tensor_descriptor(ptr, shape=[seqlen, HEAD_D], strides=[stride_s, 1],
                                      block_shape=[BLOCK, HEAD_D], layout=layout)


@gluon.jit
def _key_blocks(start_m, seqlen_k, diag, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """K/V tiles the query rows [start_m, start_m + BLOCK_M) visit: (all, unmasked)."""
    if CAUSAL:
        last = gl.minimum(seqlen_k, gl.maximum(start_m + BLOCK_M + diag, 0))
        full = gl.minimum(seqlen_k, gl.maximum(start_m + diag + 1, 0)) // BLOCK_N
    else:
        last = seqlen_k
        full = seqlen_k // BLOCK_N
    return gl.cdiv(last, BLOCK_N), full


@gluon.jit
def _softmax_update(s, m_i, l_i, col0, start_m, seqlen_k, diag, qk_scale, MASK: gl.constexpr,
                    CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """One tile of the online softmax (base 2). Returns (p fp32, alpha, m_new, l_new)."""
    s = s * qk_scale
    if MASK:
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s.type.layout))
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        ok = cols[None, :] < seqlen_k
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
        s = gl.where(ok, s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_sub = m_new
    if MASK:
        # a row that has seen no key yet keeps m = -inf; subtract 0 instead (p = 0, alpha = 0)
        m_sub = gl.where(m_new == -float("inf"), 0.0, m_new)
    p = gl.exp2(s - m_sub[:, None])
    alpha = gl.exp2(m_i - m_sub)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _count_bad(v_tile, CHUNK: gl.constexpr, BLOCK_N: gl.constexpr, v_layout: gl.constexpr):
    """Non-finite values (NaN, +-Inf) in the V tile in shared memory, read CHUNK rows at a time."""
    n = 0
    for r in gl.static_range(0, BLOCK_N, CHUNK):
        x = v_tile.slice(r, CHUNK, dim=0).load(v_layout)
        bad = (x != x) | (gl.abs(x) == float("inf"))  # noqa: PLR0124 (NaN test)
        n += gl.sum(gl.sum(bad.to(gl.int32), axis=1), axis=0)
    return n


@gluon.jit
def _mark_bad(v_tile, k_tile, CHUNK: gl.constexpr, BLOCK_N: gl.constexpr, v_layout: gl.constexpr):
    """The K tile's buffer (its scores are done) overwritten with where V's non-finite
    values are, as 0 / 1."""
    for r in gl.static_range(0, BLOCK_N, CHUNK):
        x = v_tile.slice(r, CHUNK, dim=0).load(v_layout)
        bad = (x != x) | (gl.abs(x) == float("inf"))  # noqa: PLR0124 (NaN test)
        k_tile.slice(r, CHUNK, dim=0).store(bad.to(x.dtype))
    fence_async_shared()


@gluon.jit
def _zero_bad(v_tile, CHUNK: gl.constexpr, BLOCK_N: gl.constexpr, v_layout: gl.constexpr):
    """V's non-finite values zeroed in place (idempotent: a second pass writes the same)."""
    for r in gl.static_range(0, BLOCK_N, CHUNK):
        v_rows = v_tile.slice(r, CHUNK, dim=0)
        x = v_rows.load(v_layout)
        bad = (x != x) | (gl.abs(x) == float("inf"))  # noqa: PLR0124 (NaN test)
        v_rows.store(gl.where(bad, 0.0, x).to(x.dtype))
    fence_async_shared()


@gluon.jit
def _sanitize(v_tile, k_tile, CHUNK: gl.constexpr, BLOCK_N: gl.constexpr, v_layout: gl.constexpr):
    """``_mark_bad`` then ``_zero_bad``, by threads that each own their elements of the tile."""
    _mark_bad(v_tile, k_tile, CHUNK, BLOCK_N, v_layout)
    _zero_bad(v_tile, CHUNK, BLOCK_N, v_layout)


@gluon.jit
def _nan_safe_pv(acc, p, p16, v_tile, k_tile, check_bar, it, n_full, row0, seqlen_k, diag, ROWS: gl.constexpr,
                 BLOCK_N: gl.constexpr, p_layout: gl.constexpr, v_layout: gl.constexpr, SYNC: gl.constexpr):
    """``acc + P V`` for a causal masked tile (see ``_attend_tile``), V landed in ``v_tile``."""
    n_bad = _count_bad(v_tile, 32, BLOCK_N, v_layout)
    if SYNC:
        # each consumer reads and writes the whole tile: the markers must come from V as it
        # landed, before either zeroes it. Two meetings a masked tile (phases of parity 0, 1):
        # both have read V and finished with K; then both have written the markers
        mbarrier.arrive(check_bar, count=1)
        mbarrier.wait(check_bar, 0)
        if n_bad > 0:
            _mark_bad(v_tile, k_tile, 32, BLOCK_N, v_layout)
        mbarrier.arrive(check_bar, count=1)
        mbarrier.wait(check_bar, 1)
        if n_bad > 0:
            _zero_bad(v_tile, 32, BLOCK_N, v_layout)
    else:
        if n_bad > 0:
            _sanitize(v_tile, k_tile, 32, BLOCK_N, v_layout)
    acc = warpgroup_mma(p16, v_tile, acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    if n_bad > 0:
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, p.type.layout))
        cols = it * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, p.type.layout))
        seen = (cols[None, :] < seqlen_k) & (cols[None, :] <= rows[:, None] + diag)
        hits = warpgroup_mma(gl.convert_layout(seen.to(v_tile.dtype), p_layout), k_tile, gl.zeros_like(acc),
                             use_acc=False, is_async=True)
        hits = warpgroup_mma_wait(num_outstanding=0, deps=(hits, ))
        acc = gl.where(hits > 0, float("nan"), acc)
    return acc


@gluon.jit
def _attend_tile(s, acc, m_i, l_i, v_tile, k_tile, v_bar, check_bar, phase, it, n_full, row0, seqlen_k, diag,
                 qk_scale, CAUSAL: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, o_layout: gl.constexpr,
                 p_layout: gl.constexpr, v_layout: gl.constexpr, SYNC: gl.constexpr, MASKED: gl.constexpr):
    """Key tile ``it`` after its scores ``s``: the online softmax (bounds and causal
    mask only past the ``n_full`` unmasked tiles), the rescaled accumulator, and
    ``P V`` once the V tile has landed (``v_bar`` in ``phase``), P fed from registers.
    Returns (acc, m_i, l_i). MASKED: 0 for an unmasked tile, 1 for a masked one, 2
    to tell them apart by ``it`` (full attention's single loop; causal kernels run their
    unmasked and masked tiles in loops of their own, so that no tile chooses between
    two products at run time).

    Causal masked tiles are NaN-safe as the Triton forward's (``masked_pv``): a key a row
    does not see adds nothing to it, NaN and Inf in its value included (``0 * NaN`` is NaN);
    full attention has no such key (the last tile's missing keys read as zeros).
    Their V tile is checked for non-finite values; where there are any (rarely), V's are
    zeroed in shared memory before the product, their positions written over the K
    tile (whose scores are done), and the output columns in which a row sees one become
    NaN (a second product: the row's mask times those positions). With SYNC (two consumer
    warpgroups sharing the tile, each reading and writing all of it) they meet at
    ``check_bar`` once both have read V and finished with K, and again once both have
    written the markers, before either zeroes V: both write the same values."""
    if MASKED == 2:
        if it >= n_full:
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, it * BLOCK_N, row0, seqlen_k, diag, qk_scale, True,
                                                 CAUSAL, ROWS, BLOCK_N)
        else:
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, it * BLOCK_N, row0, seqlen_k, diag, qk_scale, False,
                                                 CAUSAL, ROWS, BLOCK_N)
    else:
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, it * BLOCK_N, row0, seqlen_k, diag, qk_scale, MASKED == 1,
                                             CAUSAL, ROWS, BLOCK_N)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = gl.convert_layout(p.to(v_tile.dtype), p_layout)
    mbarrier.wait(v_bar, phase)
    if CAUSAL and MASKED == 1:
        acc = _nan_safe_pv(acc, p, p16, v_tile, k_tile, check_bar, it, n_full, row0, seqlen_k, diag, ROWS, BLOCK_N,
                           p_layout, v_layout, SYNC)
    else:
        acc = warpgroup_mma(p16, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return acc, m_i, l_i


@gluon.jit
def _finish_rows(acc, m_i, l_i, o_smem, o_desc, lse_ptr, start_m, row0, seqlen_q, o_layout: gl.constexpr,
                 BLOCK_M: gl.constexpr):
    """Normalise the output, store it by TMA (rows past seqlen_q are clipped) and the LSE."""
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    acc = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    lse = gl.where(empty, -float("inf"), (m_i + gl.log2(l_safe)) * LN2)
    rows = start_m + row0 + gl.arange(0, BLOCK_M, layout=m_i.type.layout)
    gl.store(lse_ptr + rows, lse, mask=rows < seqlen_q)
    o_smem.store(acc.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [start_m + row0, 0], o_smem)
    tma.store_wait(0)


@gluon.jit
def _program_slices(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                    stride_kh, stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, nheads, group,
                    seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, Q_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_D: gl.constexpr, CAUSAL: gl.constexpr):
    """This program's query block, descriptors and LSE row pointer. Causal blocks
    run the longest (last) query blocks first."""
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // group
    q_desc = _slice_descriptor(q_ptr, b, h, stride_qb, stride_qs, stride_qh, seqlen_q, Q_BLOCK, HEAD_D)
    o_desc = _slice_descriptor(o_ptr, b, h, stride_ob, stride_os, stride_oh, seqlen_q, Q_BLOCK, HEAD_D)
    k_desc = _slice_descriptor(k_ptr, b, hk, stride_kb, stride_ks, stride_kh, seqlen_k, BLOCK_N, HEAD_D)
    v_desc = _slice_descriptor(v_ptr, b, hk, stride_vb, stride_vs, stride_vh, seqlen_k, BLOCK_N, HEAD_D)
    lse_rows = lse_ptr + bh.to(gl.int64) * seqlen_q
    return pid_m * BLOCK_M, q_desc, k_desc, v_desc, o_desc, lse_rows


@gluon.jit
def _simple_step(it, acc, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars, q_bar, k_desc, v_desc, s_zero, n_blocks,
                 n_full, start_m, seqlen_k, diag, qk_scale, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                 v_layout: gl.constexpr, MASKED: gl.constexpr):
    """Key tile ``it`` of ``gluon_fwd_simple`` (MASKED as in ``_attend_tile``)."""
    st = it % STAGES
    phase = (it // STAGES) & 1
    mbarrier.wait(k_bars.index(st), phase)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    acc, m_i, l_i = _attend_tile(s, acc, m_i, l_i, v_smem.index(st), k_smem.index(st), v_bars.index(st), q_bar,
                                 phase, it, n_full, start_m, seqlen_k, diag, qk_scale, CAUSAL, BLOCK_M, BLOCK_N,
                                 o_layout, p_layout, v_layout, False, MASKED)
    # both matmuls that read stage st retired: refill it
    _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, it + STAGES, it + STAGES < n_blocks, BLOCK_N, STAGES)
    return acc, m_i, l_i


@gluon.jit
def gluon_fwd_simple(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                     stride_kh, stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, nheads, group,
                     seqlen_q, seqlen_k, diag, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, NUM_WARPS: gl.constexpr):
    start_m, q_desc, k_desc, v_desc, o_desc, lse_rows = _program_slices(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, nheads, group, seqlen_q, seqlen_k, BLOCK_M,
        BLOCK_M, BLOCK_N, HEAD_D, CAUSAL)
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    n_blocks, n_full = _key_blocks(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, CAUSAL)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, i, i < n_blocks, BLOCK_N, STAGES)

    m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    if CAUSAL:  # the unmasked tiles, then the masked ones (see _attend_tile)
        for it in range(n_full):
            acc, m_i, l_i = _simple_step(it, acc, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars, q_bar, k_desc,
                                         v_desc, s_zero, n_blocks, n_full, start_m, seqlen_k, diag, qk_scale, CAUSAL,
                                         BLOCK_M, BLOCK_N, STAGES, o_layout, p_layout, v_layout, 0)
        for it in range(n_full, n_blocks):
            acc, m_i, l_i = _simple_step(it, acc, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars, q_bar, k_desc,
                                         v_desc, s_zero, n_blocks, n_full, start_m, seqlen_k, diag, qk_scale, CAUSAL,
                                         BLOCK_M, BLOCK_N, STAGES, o_layout, p_layout, v_layout, 1)
    else:
        for it in range(n_blocks):
            acc, m_i, l_i = _simple_step(it, acc, m_i, l_i, q_smem, k_smem, v_smem, k_bars, v_bars, q_bar, k_desc,
                                         v_desc, s_zero, n_blocks, n_full, start_m, seqlen_k, diag, qk_scale, CAUSAL,
                                         BLOCK_M, BLOCK_N, STAGES, o_layout, p_layout, v_layout, 2)

    _finish_rows(acc, m_i, l_i, q_smem, o_desc, lse_rows, start_m, 0, seqlen_q, o_layout, BLOCK_M)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, it, pred, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of K/V tile ``it`` into stage ``it % STAGES`` (skipped when not ``pred``)."""
    st = it % STAGES
    mbarrier.expect(k_bars.index(st), k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [it * BLOCK_N, 0], k_bars.index(st), k_smem.index(st), pred=pred)
    mbarrier.expect(v_bars.index(st), v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [it * BLOCK_N, 0], v_bars.index(st), v_smem.index(st), pred=pred)


@gluon.jit
def _ws_producer(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, n_blocks, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr):
    """Producer partition: K/V tile ``it`` into stage ``it % STAGES`` once both
    consumers have released that stage's previous tile."""
    for it in range(n_blocks):
        st = it % STAGES
        # a fresh barrier counts as having completed the phase before phase 0
        mbarrier.wait(empty_bars.index(st), ((it // STAGES) & 1) ^ 1)
        _load_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, it, True, BLOCK_N, STAGES)


@gluon.jit
def _ws_step(it, acc, m_i, l_i, q_buf, k_smem, v_smem, k_bars, v_bars, empty_bars, turn_bars, check_bar, s_zero, n_full,
             row0, seqlen_k, diag, qk_scale, WG: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, o_layout: gl.constexpr,
             p_layout: gl.constexpr, v_layout: gl.constexpr, MASKED: gl.constexpr):
    """Key tile ``it`` of a consumer warpgroup of ``gluon_fwd_ws`` (MASKED as in ``_attend_tile``)."""
    st = it % STAGES
    phase = (it // STAGES) & 1
    mbarrier.wait(k_bars.index(st), phase)
    if PINGPONG:
        # take turns issuing QK^T: warpgroup 0 goes first, then each waits for the other's issue
        mbarrier.wait(turn_bars.index(WG), (it & 1) ^ (1 - WG))
    s = warpgroup_mma(q_buf, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - WG), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    acc, m_i, l_i = _attend_tile(s, acc, m_i, l_i, v_smem.index(st), k_smem.index(st), v_bars.index(st), check_bar,
                                 phase, it, n_full, row0, seqlen_k, diag, qk_scale, CAUSAL, ROWS, BLOCK_N, o_layout,
                                 p_layout, v_layout, True, MASKED)
    mbarrier.arrive(empty_bars.index(st), count=1)
    return acc, m_i, l_i


@gluon.jit
def _ws_consumer(q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars, check_bar,
                 lse_rows, start_m, n_blocks, seqlen_q, seqlen_k, diag, qk_scale, WG: gl.constexpr,
                 ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer warpgroup ``WG`` (0: the default partition, 1: a worker): query rows
    [start_m + WG * ROWS, + ROWS) against every K/V tile of the program's block. Both
    consumers take the block's masked tiles (those of the upper one) as masked, so that
    they meet at ``check_bar`` on the same tiles (see ``_attend_tile``)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    v_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    row0 = start_m + WG * ROWS
    q_buf = q_smem.index(WG)
    q_bar = q_bars.index(WG)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0, 0], q_bar, q_buf)
    _, n_full = _key_blocks(start_m, seqlen_k, diag, 2 * ROWS, BLOCK_N, CAUSAL)

    m_i = gl.full([ROWS], -float("inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    if CAUSAL:  # the unmasked tiles, then the masked ones (see _attend_tile)
        for it in range(n_full):
            acc, m_i, l_i = _ws_step(it, acc, m_i, l_i, q_buf, k_smem, v_smem, k_bars, v_bars, empty_bars, turn_bars,
                                     check_bar, s_zero, n_full, row0, seqlen_k, diag, qk_scale, WG, ROWS, BLOCK_N,
                                     STAGES, CAUSAL, PINGPONG, o_layout, p_layout, v_layout, 0)
        for it in range(n_full, n_blocks):
            acc, m_i, l_i = _ws_step(it, acc, m_i, l_i, q_buf, k_smem, v_smem, k_bars, v_bars, empty_bars, turn_bars,
                                     check_bar, s_zero, n_full, row0, seqlen_k, diag, qk_scale, WG, ROWS, BLOCK_N,
                                     STAGES, CAUSAL, PINGPONG, o_layout, p_layout, v_layout, 1)
    else:
        for it in range(n_blocks):
            acc, m_i, l_i = _ws_step(it, acc, m_i, l_i, q_buf, k_smem, v_smem, k_bars, v_bars, empty_bars, turn_bars,
                                     check_bar, s_zero, n_full, row0, seqlen_k, diag, qk_scale, WG, ROWS, BLOCK_N,
                                     STAGES, CAUSAL, PINGPONG, o_layout, p_layout, v_layout, 2)

    _finish_rows(acc, m_i, l_i, q_buf, o_desc, lse_rows, row0, 0, seqlen_q, o_layout, ROWS)


@gluon.jit
def gluon_fwd_ws(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                 stride_kh, stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, nheads, group, seqlen_q,
                 seqlen_k, diag, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                 STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 PRODUCER_REGS: gl.constexpr):
    """Warp-specialised: run with num_warps=4 (consumer warpgroup 0, the default
    partition); a worker warpgroup is consumer 1, a one-warp worker the producer."""
    ROWS: gl.constexpr = BLOCK_M // 2
    start_m, q_desc, k_desc, v_desc, o_desc, lse_rows = _program_slices(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, nheads, group, seqlen_q, seqlen_k, BLOCK_M,
        ROWS, BLOCK_N, HEAD_D, CAUSAL)
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    check_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    if CAUSAL:  # the NaN-safe masked tiles' meeting point (see _attend_tile)
        mbarrier.init(check_bar, count=2)  # one arrive per consumer warpgroup
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)  # one arrive per consumer warpgroup
    n_blocks, _ = _key_blocks(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, CAUSAL)

    gl.warp_specialize([
        (_ws_consumer, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars,
                        check_bar, lse_rows, start_m, n_blocks, seqlen_q, seqlen_k, diag, qk_scale, 0, ROWS, BLOCK_N, HEAD_D,
                        STAGES, CAUSAL, PINGPONG)),
        (_ws_consumer, (q_desc, o_desc, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, empty_bars, turn_bars,
                        check_bar, lse_rows, start_m, n_blocks, seqlen_q, seqlen_k, diag, qk_scale, 1, ROWS, BLOCK_N, HEAD_D,
                        STAGES, CAUSAL, PINGPONG)),
        (_ws_producer, (k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, empty_bars, n_blocks, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
