"""Rotary position embedding: one pass over ``x``, the rotated dims computed in
fp32 and the others copied (or, in place, left alone).

Token ``t`` of sequence ``b`` is at position ``offset[b] + t``; ``cos``/``sin``
``(seqlen_ro, rotary_dim / 2)`` hold the angles of each position. The two
halves of the rotary dims (GPT-NeoX) or neighbouring pairs (GPT-J,
INTERLEAVED) rotate; CONJUGATE rotates by the opposite angle (the gradient).
"""

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    X, Out, Cos, Sin, Offsets, CuSeqlens,
    seqlen, nheads, stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, stride_cos, stride_sin,
    offset, head_dim,
    HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, PER_SEQ_OFFSET: tl.constexpr, IS_VARLEN: tl.constexpr,
    COPY_REST: tl.constexpr, STEP: tl.constexpr = 1,
):
    """Grid: (cdiv(seqlen, BLOCK_S), batch, nheads). ``x``/``out`` ``(batch, seqlen,
    nheads, head_dim)`` through strides, or packed ``(total, nheads, head_dim)``
    with CuSeqlens (IS_VARLEN, batch stride 0). ``HALF`` = rotary_dim / 2;
    BLOCK_H its next power of two; COPY_REST copies dims past the rotary ones. STEP = 0
    puts every token of a sequence at its offset (decoding's non-causal queries)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if IS_VARLEN:
        start = tl.load(CuSeqlens + b)
        length = tl.load(CuSeqlens + b + 1) - start
    else:
        start = 0
        length = seqlen
    if pid_s * BLOCK_S >= length:
        return
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < length
    if PER_SEQ_OFFSET:
        positions = rows * STEP + tl.load(Offsets + b)
    else:
        positions = rows * STEP + offset
    x_rows = X + b.to(tl.int64) * stride_xb + (start + rows).to(tl.int64)[:, None] * stride_xs + h * stride_xh
    o_rows = Out + b.to(tl.int64) * stride_ob + (start + rows).to(tl.int64)[:, None] * stride_os + h * stride_oh
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < HALF)[None, :]
    c = tl.load(Cos + positions.to(tl.int64)[:, None] * stride_cos + cols[None, :], mask=mask, other=1.0)
    s = tl.load(Sin + positions.to(tl.int64)[:, None] * stride_sin + cols[None, :], mask=mask, other=0.0)
    c = c.to(tl.float32)
    s = s.to(tl.float32)
    if CONJUGATE:
        s = -s
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        first, second = 2 * cols, 2 * cols + 1
    else:  # halves (i, HALF + i)
        first, second = cols, HALF + cols
    x1 = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_rows + first[None, :], (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=mask)
    tl.store(o_rows + second[None, :], (x1 * s + x2 * c).to(Out.dtype.element_ty), mask=mask)
    if COPY_REST:
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)
        rest_mask = row_ok[:, None] & (rest < head_dim)[None, :]
        tl.store(o_rows + rest[None, :], tl.load(x_rows + rest[None, :], mask=rest_mask), mask=rest_mask)
