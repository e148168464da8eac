"""FP8 quantisation of q, k or v (flash_attn layout), with the incoherent
rotation fused in: the FP8 front end's kernel (``flashtile.fp8.quantize_qkv``).

One program takes one scale block of one (batch, kv head): ``SCALE_BLOCK``
consecutive positions of the sequence, and at each position the ``group``
heads that share the kv head (q's query heads of one GQA group; 1 for k and
v). It walks these ``SCALE_BLOCK * group`` rows of ``HEAD_DIM`` values in
chunks of ``BLOCK_R`` rows. A chunk is loaded, upcast to fp32 and, with
``ROTATE``, multiplied by the rotation with one ``tl.dot``: ``R`` holds the
rotation's entries without their normalisation (+-1 and 0, exact in every
dtype), so 16-bit rows are multiplied in their own dtype with no rounding of
the products, and ``COLSCALE`` (``1 / sqrt(size of the Hadamard block)`` per
column) is applied to the fp32 result. Both are loaded once per program.

``PHASE`` (constexpr):

* 0: only the block's amax (of the rotated values) is written, to
  ``AMAX[pid_bh, block]`` (contiguous ``(batch, nheads_k, blocks)``); the
  launcher reduces it to one scale per head or per tensor;
* 1: the descale is read at ``DESCALE + b * stride_db + hk * stride_dh +
  block * stride_dn`` and the rows are quantised;
* 2: the block's own scale ("block" scaling): amax over the block's rows, the
  descale ``amax / FP8_MAX`` (1 for an all-zero block, at least fp32's
  smallest normal) written to ``DESCALE[pid_bh, block]``, then the rows
  (rotated again: the input is read twice, the second time mostly from L2)
  are quantised.

Quantising is ``to_e4m3(x / descale)`` with a correctly rounded division, the
same arithmetic as the PyTorch path (``backends/torch_quantize.py``).
"""

import triton
import triton.language as tl

from .fp8 import E4M3_MAX, to_e4m3

# fp32's smallest normal: the least descale (amax / E4M3_MAX never underflows to 0)
_TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _rows(X, x_base, r0, n_rows, group, stride_xs, stride_xh, rot, cscale,
          HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROTATE: tl.constexpr,
          DOT_FP32: tl.constexpr):
    """Rows ``r0 .. r0 + BLOCK_R`` of a block (row ``r`` is position ``r // group``,
    head ``r % group``), rotated (``rot``: the +-1 matrix, ``cscale``: its column
    scales, both loaded once per program), in fp32; and their mask."""
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    offs = x_base + (rows // group).to(tl.int64)[:, None] * stride_xs + (rows % group)[:, None] * stride_xh \
        + cols[None, :]
    ok = (rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0)
    if ROTATE:
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), rot, input_precision="ieee")
        else:
            acc = tl.dot(x, rot)  # +-1 and 0 in x's dtype: exact products, fp32 sums
        y = acc * cscale[None, :]
    else:
        y = x.to(tl.float32)
    return y, ok


@triton.jit
def quantize_kernel(X, Y, R, COLSCALE, AMAX, DESCALE,
                    seqlen, nheads_k, group,
                    stride_xb, stride_xs, stride_xh,
                    stride_yb, stride_ys, stride_yh,
                    stride_db, stride_dh, stride_dn,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    SCALE_BLOCK: tl.constexpr, ROTATE: tl.constexpr, DOT_FP32: tl.constexpr,
                    PHASE: tl.constexpr, EXACT: tl.constexpr):
    """Grid: (cdiv(seqlen, SCALE_BLOCK), batch * nheads_k). X's and Y's last dimension
    is contiguous; Y has X's shape (float8_e4m3fn)."""
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads_k
    hk = pid_bh % nheads_k
    start = blk * SCALE_BLOCK
    n_rows = tl.minimum(SCALE_BLOCK, seqlen - start) * group
    x_base = b.to(tl.int64) * stride_xb + start.to(tl.int64) * stride_xs + (hk * group).to(tl.int64) * stride_xh
    y_base = b.to(tl.int64) * stride_yb + start.to(tl.int64) * stride_ys + (hk * group).to(tl.int64) * stride_yh
    n_blocks = tl.num_programs(0)
    if ROTATE:
        r_offs = tl.arange(0, BLOCK_D)
        rot = tl.load(R + r_offs[:, None] * BLOCK_D + r_offs[None, :])
        if not DOT_FP32:
            rot = rot.to(X.dtype.element_ty)
        cscale = tl.load(COLSCALE + r_offs)
    else:
        rot = 0.0
        cscale = 0.0

    if PHASE != 1:
        amax = tl.max(tl.zeros([BLOCK_R], dtype=tl.float32), 0)
        for r0 in range(0, n_rows, BLOCK_R):
            y, _ = _rows(X, x_base, r0, n_rows, group, stride_xs, stride_xh, rot, cscale,
                         HEAD_DIM, BLOCK_R, BLOCK_D, ROTATE, DOT_FP32)
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(y), 1), 0))
        if PHASE == 0:
            tl.store(AMAX + pid_bh * n_blocks + blk, amax)
        else:
            descale = tl.where(amax > 0, tl.maximum(tl.div_rn(amax, E4M3_MAX), _TINY), 1.0)
            tl.store(DESCALE + pid_bh * n_blocks + blk, descale)
            _quantize_rows(X, Y, x_base, y_base, n_rows, group, stride_xs, stride_xh, stride_ys, stride_yh, rot,
                           cscale, descale, HEAD_DIM, BLOCK_R, BLOCK_D, ROTATE, DOT_FP32, EXACT)
    else:
        descale = tl.load(DESCALE + b * stride_db + hk * stride_dh + blk * stride_dn)
        _quantize_rows(X, Y, x_base, y_base, n_rows, group, stride_xs, stride_xh, stride_ys, stride_yh, rot,
                       cscale, descale, HEAD_DIM, BLOCK_R, BLOCK_D, ROTATE, DOT_FP32, EXACT)


@triton.jit
def _quantize_rows(X, Y, x_base, y_base, n_rows, group, stride_xs, stride_xh, stride_ys, stride_yh, rot, cscale,
                   descale, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROTATE: tl.constexpr, DOT_FP32: tl.constexpr, EXACT: tl.constexpr):
    for r0 in range(0, n_rows, BLOCK_R):
        y, ok = _rows(X, x_base, r0, n_rows, group, stride_xs, stride_xh, rot, cscale,
                      HEAD_DIM, BLOCK_R, BLOCK_D, ROTATE, DOT_FP32)
        rows = r0 + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        y_offs = y_base + (rows // group).to(tl.int64)[:, None] * stride_ys + (rows % group)[:, None] * stride_yh \
            + cols[None, :]
        tl.store(Y + y_offs, to_e4m3(tl.div_rn(y, descale), EXACT), mask=ok)
