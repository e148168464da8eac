"""Launchers of the attention kernels (forward, dQ, dK/dV; dense, varlen and
block-sparse): output allocation, grids, strides, the kernels' switches, and
the launch-table names they look up.

Tensors arrive in flash_attn layout ``(batch, seqlen, nheads, headdim)`` with
a contiguous last dimension; any other strides are passed to the kernels.
"""

from __future__ import annotations

import os

import torch
import triton

from ....options import FP8_SCALE_BLOCK, AttnOptions, empty_output
from ..kernels.backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ..kernels.forward import attn_fwd_kernel
from ..kernels.tiles import BIAS_ADD, BIAS_BOOL, BIAS_NONE
from .choose import launch_kernel
from .device import (LOG2E, block_d_of, capability_of, cdiv, dot_precision, env_flag, interpreting,
                     scratch_allocator, tail_heads, tma_compatible)
from .gluon import gluon_attention_forward, gluon_backward_dkdv, gluon_backward_supported, gluon_forward_supported
from .invariant import batch_invariant
from .plans import plan_key, run_planned
from .table import split_dkdv


def _keys_per_row(lay: "_Layout", opts: AttnOptions) -> int:
    """About how many keys one query row attends to."""
    keys = lay.seqlen_k
    if opts.window_left >= 0 and opts.window_right >= 0:
        keys = min(keys, opts.window_left + opts.window_right + 1)
    elif opts.window_right >= 0 or opts.window_left >= 0:
        keys //= 2
    return keys


def _descriptor_mode(env_name: str, default: int, keys_per_row: int, min_keys: int, rows: int,
                     *tensors: torch.Tensor) -> int:
    """0: pointer loads; 1: tensor descriptors built in the kernel; 2: built on the host.
    On Hopper, ``default`` once a query row sees ``min_keys`` keys or more (shorter
    rows: pointer loads measured as fast or faster); ``env_name`` (0, 1 or 2)
    overrides, for experiments. Unaligned tensors, and descriptors over fewer
    than TMA_MIN_ROWS rows (``rows``; a length of 1 becomes a compile-time
    constant that Triton's descriptor lowering rejects), take pointer loads."""
    capability = capability_of(tensors[0].device)
    hopper = capability is not None and capability[0] >= 9
    env = os.environ.get(env_name)
    if env is None:
        mode = default if hopper and keys_per_row >= min_keys else 0
    else:
        mode = int(env)
    if rows < TMA_MIN_ROWS or not tma_compatible(*tensors):
        mode = 0
    if mode == 1 and tensors[0].is_cuda:
        # device-side descriptors live in a small global scratch buffer. Triton keeps the
        # allocator per thread, and autograd runs the backward in a thread of its own: set it
        # on every call rather than once.
        triton.set_allocator(scratch_allocator)
    return mode


def _paged_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_per_row: int) -> int:
    """KV_DESC of a forward over a paged cache ``(num_pages, page_size, nheads_k, dim)``: 1
    (descriptors over the stacked pages, key tiles capped at the page; see ``choose``)
    where contiguous K/V would take descriptors (by default only with FLASHTILE_FWD_TMA=1:
    DEFAULT_PAGED_TMA), 16-bit pages of a multiple of 64 keys lie
    ``page_size`` rows apart and their rows fit int32; else 0 (pointer loads, rows found
    through the block table one by one)."""
    num_pages, page_size = k.shape[0], k.shape[1]
    stacked = (page_size % 64 == 0 and q.element_size() == 2 and num_pages * page_size < 2**31
               and all(t.stride(0) == page_size * t.stride(1) for t in (k, v)))
    if not stacked or _descriptor_mode("FLASHTILE_FWD_TMA", DEFAULT_PAGED_TMA, _load_keys(keys_per_row),
                                       FWD_TMA_MIN_KEYS, num_pages * page_size, k, v) == 0:
        return 0
    if q.is_cuda:
        triton.set_allocator(scratch_allocator)  # in-kernel descriptors (see _descriptor_mode)
    return 1


def _load_keys(keys_per_row: int) -> int:
    """The keys a row sees, as the forward's choice of loads takes it: in batch-invariant mode
    a fixed count (the loads must not depend on the batch's longest rows)."""
    return FWD_TMA_MIN_KEYS if batch_invariant() else keys_per_row


def _forward_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_per_row: int) -> dict:
    """KV_DESC (see ``_descriptor_mode``, FLASHTILE_FWD_TMA) and WARP_SPECIALIZE
    (FLASHTILE_FWD_WS = 0 or 1) for the forward kernel."""
    capability = capability_of(q.device)
    hopper = capability is not None and capability[0] >= 9
    warp_spec = env_flag("FLASHTILE_FWD_WS")
    warp_spec = hopper and DEFAULT_FWD_WS if warp_spec is None else warp_spec and capability is not None
    kv_desc = _descriptor_mode("FLASHTILE_FWD_TMA", DEFAULT_FWD_TMA, _load_keys(keys_per_row), FWD_TMA_MIN_KEYS,
                               k.shape[-3], k, v)
    if q.element_size() > 2 and "FLASHTILE_FWD_TMA" not in os.environ:
        # 4-byte tiles through descriptors ran far slower than pointer loads on Hopper
        # (docs/experiments/2026-11-22-cosine-sim-block-sparse.md)
        kv_desc = 0
    return dict(KV_DESC=kv_desc, WARP_SPECIALIZE=bool(warp_spec))


# Tensor descriptors (bulk copies) free the registers that pointer loads hold, which pays
# once a row streams enough keys to hide the descriptors' setup; below, pointer loads are
# as fast. In-kernel descriptors, not host-built ones. Thresholds measured per head dim
# (docs/experiments/2026-11-22-h100-kernels.md, 2026-11-23-h200-host-tiles.md). The backward's:
DEFAULT_FWD_TMA = 1
DEFAULT_BWD_TMA = 1
# paged prefill through descriptors over the stacked pages (``_paged_descriptors``): opt-in
# (FLASHTILE_FWD_TMA=1): on an H100 it was right but no faster than pointer loads (docs/performance.md)
DEFAULT_PAGED_TMA = 0
TMA_MIN_KEYS = 2048
# head dims above 64 carry larger tiles per key and gain from fewer keys a row; head dim 64 does not
TMA_MIN_KEYS_WIDE = 1024
# the forward: from 1k keys at every head dim, where the two-halves tiles (which need the
# registers descriptors free) take over (docs/experiments/2026-12-01-halves-schedule.md)
FWD_TMA_MIN_KEYS = 1024
# forward rows that see fewer keys than this take the "_short" launch-table entries, per
# mask ("" = full attention): causal below 2k keys a row (seqlen < 4k), full below 8k
SHORT_KEYS = {"_causal": 2048, "": 8192}
# every launch-table name the forward launcher can ask for (tools and tests force configs on all)
FORWARD_NAMES = [f"fwd{tma}{mask}{short}" for tma in ("", "_tma") for mask in ("", "_causal", "_window")
                 for short in ("", "_short")]
TMA_MIN_ROWS = 128
DEFAULT_FWD_WS = False


# Fixed softmax offset (cosine-similarity attention). P = exp2(s - offset) with the offset
# FIXED_MAX_HEADROOM (log2 units) below the score bound is at most 2**14: P cast to fp16 for
# the PV product cannot overflow, even when scores exceed their bound by up to 1.1 (natural
# units: rounding, inputs normalised by the caller). Below, fp16 keeps full precision down
# to 2**-14: scores from bound down to -bound fit (about) when 2 * bound * log2(e) <= 29,
# i.e. bound <= 10 (scale 10, one group). Beyond that an fp16 row whose visible keys all score
# far below the bound would lose its probabilities to underflow, so fp16 takes the running
# max instead (exact, also no overflow). bf16 and fp32 have fp32's exponent range: no limit.
FIXED_MAX_HEADROOM = 14.0
FIXED_MAX_FP16_RANGE = 29.0


def fixed_offset(opts: AttnOptions, dtype: torch.dtype) -> float | None:
    """The forward kernel's fixed softmax offset (log2 units), or None for the running row max."""
    if opts.fixed_max is None:
        return None
    if dtype == torch.float16 and 2 * opts.fixed_max * LOG2E > FIXED_MAX_FP16_RANGE:
        return None
    return opts.fixed_max * LOG2E - FIXED_MAX_HEADROOM


def batch_seq_head_strides(t: torch.Tensor, varlen: bool = False) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (batch, seqlen, heads, dim) tensor;
    for a packed varlen tensor (1, total, heads, dim) the batch stride is 0."""
    batch, seq, head = t.stride()[:3]
    return 0 if varlen else batch, seq, head


def _tile_lists(lists: tuple | None, q: torch.Tensor) -> tuple:
    """The kernels' tile-list arguments: ``lists`` (from ``_sparse_args``), or
    without block sparsity q for the unused pointers."""
    return (q, q, q, 0, 0, 0, 0) if lists is None else lists


def _sparse_args(full: torch.Tensor, part: torch.Tensor, patterns: torch.Tensor) -> tuple:
    """Kernel arguments of block-sparse tile lists ``(B, H, n_blocks, width)``: the
    lists, the patterns, the list-row strides of batch and head (0 where
    broadcast) and the two row lengths."""
    b, h, n_blocks, _ = full.shape
    return (full, part, patterns, h * n_blocks if b > 1 else 0, n_blocks if h > 1 else 0,
            full.shape[-1], part.shape[-1])


def _option_tensors(q: torch.Tensor, opts: AttnOptions, cu_seqlens_q, cu_seqlens_k) -> tuple:
    """The kernels' per-call pointer arguments besides the attention tensors:
    (cu_seqlens_q, cu_seqlens_k, bias, alibi); unused ones get q."""
    bias = opts.bias
    if bias is None:
        bias = q
    elif bias.dtype == torch.bool:
        bias = bias.view(torch.uint8)
    return (q if cu_seqlens_q is None else cu_seqlens_q, q if cu_seqlens_k is None else cu_seqlens_k, bias,
            q if opts.alibi is None else opts.alibi)


def block_dv_of(head_dim: int, head_dim_v: int) -> int:
    """Tile width of the value head dim: its power of two (``block_d_of``), but the q/k
    tile's width where that is wider and the value tile has masked columns. Such narrower
    tiles gave wrong results and illegal memory accesses on an H100 (q/k 24 with v 12,
    40 with 24, in varlen calls); as wide as the key tile they computed right there."""
    block = block_d_of(head_dim_v)
    wide = block_d_of(head_dim)
    return wide if head_dim_v != block and block < wide else block


class _Layout:
    """Batch geometry, feature switches and the score arguments shared by the forward, dQ and dK/dV kernels:
    everything but the tensors themselves, so a launch plan (``LaunchPlan``) can keep it.
    ``sparse``: the ``BlockMask`` of block-sparse attention, or None."""

    def __init__(self, q, k, v, opts: AttnOptions, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 sparse=None):
        self.varlen = cu_seqlens_q is not None
        self.batch = cu_seqlens_q.numel() - 1 if self.varlen else q.shape[0]
        self.nheads, self.nheads_k = q.shape[2], k.shape[2]
        self.seqlen_q = max_seqlen_q if self.varlen else q.shape[1]
        self.seqlen_k = max_seqlen_k if self.varlen else k.shape[1]
        bias = opts.bias
        if bias is None:
            self.bias_strides, bias_kind, bias_rows = (0, 0, 0, 0), BIAS_NONE.value, False
        else:
            self.bias_strides = bias.stride()
            bias_kind = (BIAS_BOOL if bias.dtype == torch.bool else BIAS_ADD).value
            bias_rows = bias.stride(2) != 0 and bias.shape[2] > 1
        self.alibi_stride = 0 if opts.alibi is None else opts.alibi.stride(0)
        self.const = dict(
            HEAD_DIM=q.shape[-1], BLOCK_D=block_d_of(q.shape[-1]),
            HEAD_DIM_V=v.shape[-1], BLOCK_DV=block_dv_of(q.shape[-1], v.shape[-1]),
            MASK_LEFT=opts.window_left >= 0, MASK_RIGHT=opts.window_right >= 0,
            SOFTCAP=opts.softcap > 0, HAS_ALIBI=opts.alibi is not None,
            BIAS_KIND=bias_kind, BIAS_ROWS=bias_rows, DROPOUT=opts.dropout_p > 0, IS_VARLEN=self.varlen,
            UPCAST=interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=dot_precision(q.dtype, q.device),
        )
        softcap = opts.softcap if opts.softcap > 0 else 1.0
        # argument groups, in the kernels' order: (max_seqlen_q, max_seqlen_k, diag_offset, window_left,
        # window_right), (qk_scale, softcap_in, softcap_out), (dropout_p, dropout_scale); the seed is per call
        self.positions = (self.seqlen_q, self.seqlen_k, opts.diag_offset, opts.window_left, opts.window_right)
        self.scores = (opts.softmax_scale * LOG2E, opts.softmax_scale / softcap, softcap * LOG2E)
        self.dropout = (opts.dropout_p, 1.0 / (1.0 - opts.dropout_p))
        # forward only: the fixed softmax offset (log2 units) that replaces the running row max
        self.fixed_max = fixed_offset(opts, q.dtype)
        # block-sparse tile lists: (forward and dQ kernels), (dK/dV kernel); None without (see _tile_lists)
        self.sparse_fwd = self.sparse_bwd = None
        self.const["SPARSE"] = sparse is not None
        if sparse is not None:
            lists = sparse.kernel_lists()
            self.sparse_fwd = _sparse_args(lists.fwd_full, lists.fwd_part, lists.pattern_bits)
            self.sparse_bwd = _sparse_args(lists.bwd_full, lists.bwd_part, lists.pattern_bits)
            self.const["SPARSE_BM"], self.const["SPARSE_BN"] = sparse.block_size

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return 0 if self.varlen else lse.stride(0), lse.stride(1)



def attention_forward(q, k, v, opts: AttnOptions, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                      max_seqlen_k=0, sparse=None, seqused_k=None, block_table=None, fp8=None):
    """Returns (out, lse): out like q (with v's head dim), lse (batch, nheads, seqlen_q) fp32.

    Varlen: q (total_q, nheads, d), k/v (total_k, nheads_k, d) given with
    int32 ``cu_seqlens_q/k``; lse is then (nheads, total_q). ``seqused_k``:
    int32 (batch,), sequence ``b`` uses only its first ``seqused_k[b]`` keys.
    ``block_table``: int32 (batch, max_pages), k/v paged (num_pages, page_size,
    nheads_k, d) (see the forward kernel). ``sparse``: a ``BlockMask``
    (block-sparse attention; not with varlen).
    ``fp8``: for float8_e4m3fn q, k, v, ``(q_descale, k_descale, v_descale, out_dtype)``:
    contiguous fp32 descales ``(batch, nheads_k)``, q's and k's optionally with a third
    dimension of one scale per FP8_SCALE_BLOCK rows; out is then ``out_dtype``.
    """
    if gluon_forward_supported(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, sparse, seqused_k, block_table, fp8):
        return gluon_attention_forward(q, k, v, opts)  # Hopper kernels where they measured faster (see gluon.py)
    varlen = cu_seqlens_q is not None
    if varlen:
        q = q.unsqueeze(0)
        if block_table is None:
            k, v = k.unsqueeze(0), v.unsqueeze(0)
    descales = (q, q, q) if fp8 is None else fp8[:3]
    out = empty_output(q, v.shape[-1], None if fp8 is None else fp8[3])
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), device=q.device, dtype=torch.float32)
    sinks = q if opts.sinks is None else opts.sinks
    call = (q, k, v, out, lse, *_option_tensors(q, opts, cu_seqlens_q, cu_seqlens_k), sinks, seqused_k, block_table,
            opts.seed, *descales)
    key = None if sparse is not None else plan_key(
        "fwd", (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, out, *descales), opts,
        (max_seqlen_q, max_seqlen_k))
    run_planned(key, call, lambda build_only: _forward_steps(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, sparse, call, build_only))
    if varlen:
        return out.squeeze(0), lse.squeeze(0)
    return out, lse


def _forward_steps(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse, call, build_only):
    """The forward launch, run (or with ``build_only`` only built) for ``call``: ([step], [builder])."""
    lay = _Layout(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse)
    varlen = lay.varlen
    keys_per_row = _keys_per_row(lay, opts)
    if opts.sinks is not None and lay.fixed_max is not None:
        raise NotImplementedError("flashtile: sinks with a fixed softmax offset (cosine-similarity attention)")
    seqused_k, block_table = call[10], call[11]
    paged = block_table is not None
    const = (lay.const | dict(FIXED_MAX=lay.fixed_max is not None, HAS_SINKS=opts.sinks is not None,
                              HAS_SEQUSED=seqused_k is not None, PAGE_SIZE=k.shape[1] if paged else 0)
             | _forward_features(q, k, v, keys_per_row))
    if paged:
        const["KV_DESC"] = _paged_descriptors(q, k, v, keys_per_row)
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8:
        q_descale, k_descale = call[13], call[14]
        const |= dict(FP8=True, Q_SCALE_BLOCKS=q_descale.dim() == 3, K_SCALE_BLOCKS=k_descale.dim() == 3,
                      SCALE_BLOCK=FP8_SCALE_BLOCK, EXACT_FP8=interpreting())
        descale_strides = (*q_descale.stride()[:2], *k_descale.stride()[:2], call[15].stride(0), v.stride(-1))
        if v.stride(-1) != 1:
            # sequence-major V (see ops/fp8.py): descriptors over its transpose where K takes them and
            # every (batch, kv head) of V starts 16-byte aligned (not packed batches), else pointer loads
            const["V_SEQ_MAJOR"] = True
            v_aligned = (not varlen and v.data_ptr() % 16 == 0
                         and all(st % 16 == 0 for i, st in enumerate(v.stride()) if i != 1))
            kv_desc = _descriptor_mode("FLASHTILE_FWD_TMA", DEFAULT_FWD_TMA, _load_keys(keys_per_row),
                                       FWD_TMA_MIN_KEYS, k.shape[-3], k)
            const["KV_DESC"] = min(kv_desc, 1) if v_aligned and not paged else 0
    else:
        descale_strides = (0, 0, 0, 0, 0, 1)
    block_d, block_dv = const["BLOCK_D"], const["BLOCK_DV"]
    # launch-table names: "_tma" with descriptors, "_causal" for a causal mask alone, "_window"
    # with a left window bound, "_short" when the rows see fewer than SHORT_KEYS keys
    mask = "_window" if const["MASK_LEFT"] else "_causal" if const["MASK_RIGHT"] else ""
    causal = mask == "_causal"
    name = ("fwd_tma" if const["KV_DESC"] else "fwd") + mask
    if keys_per_row < SHORT_KEYS.get(mask, 0):
        name += "_short"
    out, lse = call[3], call[4]
    # paged K/V: (page, row in page, head) strides
    before_seed = (*batch_seq_head_strides(q, varlen), *batch_seq_head_strides(k, varlen and not paged),
                   *batch_seq_head_strides(v, varlen and not paged), *batch_seq_head_strides(out, varlen),
                   *lay.lse_strides(lse),
                   *lay.bias_strides, lay.alibi_stride, lay.nheads, lay.nheads // lay.nheads_k, *lay.positions,
                   *lay.scores, *lay.dropout)
    fixed_max = 0.0 if lay.fixed_max is None else lay.fixed_max
    host_desc = const["KV_DESC"] == 2
    table_geometry = (block_table.stride(0), block_table.shape[1], k.shape[0]) if paged else (0, 0, 0)

    def build(cfg, call):
        q, k, v, out, lse, cu_q, cu_k, bias, alibi, sinks, seqused, table, seed, q_ds, k_ds, v_ds = call
        if host_desc:
            from triton.tools.tensor_descriptor import TensorDescriptor

            k, v = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, cfg.block_n, 1, width])
                    for t, width in ((k, block_d), (v, block_dv)))
        return (q, k, v, out, lse, cu_q, cu_k, bias, alibi, sinks, *before_seed, seed, fixed_max,
                *_tile_lists(lay.sparse_fwd, q),
                tail_heads(cdiv(lay.seqlen_q, cfg.block_m), lay.batch * lay.nheads, causal, q.device),
                q if seqused is None else seqused, q if table is None else table, *table_geometry,
                q_ds, k_ds, v_ds, *descale_strides)

    step = launch_kernel(name, attn_fwd_kernel, lambda c: (cdiv(lay.seqlen_q, c.block_m) * lay.batch * lay.nheads,),
                   lambda cfg: build(cfg, call), const, q, max(block_d, block_dv), (lay.seqlen_q, lay.seqlen_k),
                   build_only=build_only)
    return [step], [build]


def attention_backward(dout, q, k, v, out, lse, opts: AttnOptions, bias_grad: bool = False,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, sparse=None,
                       seqused_k=None):
    """Returns (dq, dk, dv, dbias, dsinks): dq, dk, dv shaped and typed like q, k, v;
    dbias the fp32 gradient of ``opts.bias`` before broadcast reduction, (batch,
    nheads, seqlen_q, seqlen_k), or None unless ``bias_grad``; dsinks the fp32
    gradient of ``opts.sinks`` ``(nheads,)``, or None without sinks. ``sparse``,
    ``seqused_k``: as in ``attention_forward`` (keys a sequence does not use get
    zero gradients)."""
    varlen = cu_seqlens_q is not None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if varlen:
        q, k, v, out, dout, lse = (t.unsqueeze(0) for t in (q, k, v, out, dout, lse))
    # rowsum(dO * O) per query row, in lse's layout: written by the dQ kernel, read by dK/dV
    # (zeros with sinks in a varlen batch: rows past its last sequence then add nothing to their gradient)
    delta = torch.zeros_like(lse) if varlen and opts.sinks is not None else torch.empty_like(lse)
    dq = torch.empty_like(q)
    # keys past a sequence's seqused_k are written by no program
    dk, dv = (torch.empty_like(t) if seqused_k is None else torch.zeros_like(t) for t in (k, v))
    dbias = None
    if bias_grad:
        batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        shape = (batch, q.shape[2], max_seqlen_q if varlen else q.shape[1], max_seqlen_k if varlen else k.shape[1])
        dbias = torch.zeros(shape, device=q.device, dtype=torch.float32)
    call = (q, k, v, dout, out, lse, delta, dq, dk, dv, q if dbias is None else dbias,
            *_option_tensors(q, opts, cu_seqlens_q, cu_seqlens_k), seqused_k, opts.seed)
    # the Gluon dK/dV kernel on Hopper where it is asked for (see gluon.py); the Triton dQ kernel then
    # runs alone and writes delta, which it reads
    gluon_dkdv = gluon_backward_supported(q, k, v, dout, lse, opts, bias_grad, varlen, sparse, seqused_k)
    key = None if sparse is not None else plan_key(
        "bwd", (q, k, v, dout, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k), opts,
        (max_seqlen_q, max_seqlen_k, bias_grad, gluon_dkdv))
    run_planned(key, call, lambda build_only: _backward_steps(q, k, v, opts, bias_grad, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k, sparse, call, build_only,
                                                       dq_only=gluon_dkdv))
    if gluon_dkdv:
        gluon_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, opts.softmax_scale, opts.window_right == 0,
                            opts.diag_offset)
    dsinks = None if opts.sinks is None else sinks_grad(opts.sinks, lse, delta)
    if varlen:
        dq, dk, dv = dq.squeeze(0), dk.squeeze(0), dv.squeeze(0)
    return dq, dk, dv, dbias, dsinks


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The gradient of the sinks ``(nheads,)`` from every row's LSE and ``delta = rowsum(dO *
    O)``, both ``(batch, nheads, rows)`` fp32: the sink is a key of value zero, so its score's
    gradient in row ``i`` is ``P_sink (0 - delta_i)`` with ``P_sink = exp(sink - lse_i)``."""
    # rows with delta 0 add nothing, whatever their LSE (-inf where a row saw nothing, not even a sink)
    return -torch.where(delta == 0, 0.0, torch.exp(sinks[:, None] - lse) * delta).sum((0, 2))


def _backward_steps(q, k, v, opts, bias_grad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse,
                    call, build_only, dq_only=False):
    """The dQ and dK/dV launches, run (or with ``build_only`` only built) for ``call``: (steps, builders).
    ``dq_only``: the dQ launch alone (another kernel computes dK and dV)."""
    lay = _Layout(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse)
    varlen = lay.varlen
    dout, out, lse, dq, dk, dv, dbias = call[3], call[4], call[5], call[7], call[8], call[9], call[10]
    # tensor descriptors (in the kernel) for Q/dO in dK/dV and K/V in dQ: FLASHTILE_BWD_TMA = 0 or 1
    min_keys = TMA_MIN_KEYS if q.shape[-1] <= 64 else TMA_MIN_KEYS_WIDE
    use_desc = _descriptor_mode("FLASHTILE_BWD_TMA", DEFAULT_BWD_TMA, _keys_per_row(lay, opts), min_keys,
                                min(q.shape[1], k.shape[1]), q, k, v, dout) == 1
    const = lay.const | dict(USE_DESC=use_desc, HAS_SEQUSED=call[15] is not None)
    # launch-table entries of the wider of the two head dims (the larger tiles)
    block_d = max(const["BLOCK_D"], const["BLOCK_DV"])
    nheads, nheads_k = lay.nheads, lay.nheads_k
    dbias_strides = dbias.stride() if bias_grad else (0, 0, 0, 0)
    scale = opts.softmax_scale
    common = (*lay.lse_strides(lse), *lay.bias_strides)
    causal = const["MASK_RIGHT"] and not const["MASK_LEFT"]
    # launch-table names: the kernel, "_tma" with descriptors, "_causal" for a causal mask alone
    suffix = ("_tma" if use_desc else "") + ("_causal" if causal else "")
    dq_scalars = (*batch_seq_head_strides(q, varlen), *batch_seq_head_strides(k, varlen), *batch_seq_head_strides(v, varlen), *batch_seq_head_strides(dout, varlen), *batch_seq_head_strides(out, varlen),
                  *batch_seq_head_strides(dq, varlen), *common, lay.alibi_stride, nheads, nheads // nheads_k, *lay.positions, scale,
                  *lay.scores, *lay.dropout)
    dkdv_scalars = (*batch_seq_head_strides(q, varlen), *batch_seq_head_strides(k, varlen), *batch_seq_head_strides(v, varlen), *batch_seq_head_strides(dout, varlen), *batch_seq_head_strides(dk, varlen),
                    *batch_seq_head_strides(dv, varlen), *common, *dbias_strides, lay.alibi_stride, nheads_k, nheads // nheads_k,
                    *lay.positions, scale, *lay.scores, *lay.dropout)

    def build_dq(cfg, call):
        q, k, v, dout, out, lse, delta, dq, _, _, _, cu_q, cu_k, bias, alibi, seqused, seed = call
        return (q, k, v, dout, out, dq, lse, delta, cu_q, cu_k, bias, alibi, *dq_scalars, seed,
                *_tile_lists(lay.sparse_fwd, q),
                tail_heads(cdiv(lay.seqlen_q, cfg.block_m), lay.batch * nheads, causal, q.device),
                q if seqused is None else seqused)

    def build_dkdv(cfg, call):
        q, k, v, dout, _, lse, delta, _, dk, dv, dbias, cu_q, cu_k, bias, alibi, seqused, seed = call
        return (q, k, v, dout, dk, dv, lse, delta, cu_q, cu_k, bias, dbias, alibi, *dkdv_scalars, seed,
                *_tile_lists(lay.sparse_bwd, q),
                tail_heads(cdiv(lay.seqlen_k, cfg.block_n), lay.batch * nheads_k, causal, q.device),
                q if seqused is None else seqused)

    seqlens = (lay.seqlen_q, lay.seqlen_k)
    step_dq = launch_kernel("dq" + suffix, attn_bwd_dq_kernel,
                      lambda c: (cdiv(lay.seqlen_q, c.block_m) * lay.batch * nheads,), lambda cfg: build_dq(cfg, call), const, q, block_d, seqlens, build_only=build_only)
    # dK and dV together, or (FLASHTILE_BWD_SPLIT = 1, by default where the launch table says so)
    # in two launches, dV first: PART 1 (dV) does not need the dQ kernel's delta
    split = env_flag("FLASHTILE_BWD_SPLIT")
    if split is None:
        split = split_dkdv(block_d, q.element_size(), capability_of(q.device))
    parts = [] if dq_only else [("dv", 1), ("dk", 2)] if split else [("dkdv", 0)]
    steps = [step_dq] + [
        launch_kernel(name + suffix, attn_bwd_dkdv_kernel, lambda c: (cdiv(lay.seqlen_k, c.block_n) * lay.batch * nheads_k,),
                lambda cfg: build_dkdv(cfg, call), const | dict(BIAS_GRAD=bias_grad and part != 1, PART=part), q,
                block_d, seqlens, build_only=build_only)
        for name, part in parts]
    return steps, [build_dq] + [build_dkdv] * len(parts)

