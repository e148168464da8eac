"""Launcher of the Gluon (Hopper, FlashAttention-3 structure) forward kernels,
and the rule of when they apply.

On compute capability 9.0 only, and by default where a GPU run measured the
warp-specialised kernel faster than the Triton forward (H100, bf16;
docs/experiments/2026-12-07-gluon-forward.md). Full attention: head dim 64
from ``GLUON_MIN_KEYS[64]`` keys a row (1.11-1.18x at 1k-16k), head dim 128
from ``GLUON_MIN_KEYS[128]`` (1.05x at 16k, 0.95-0.99x at 1k-4k).
Causal calls take it by default from ``GLUON_CAUSAL_MIN_KEYS`` keys a row:
with its NaN-safe masked tiles (``_attend_tile``) it passed the accuracy and NaN
tests on an H100 and ran at 1.34x / 1.08x / 1.06x the Triton forward at
1k / 4k / 16k at head dim 128, and 0.69x / 1.11x / 1.23x at head dim 64 (so
from 4k keys there).
``FLASHTILE_GLUON=1`` takes it for every call it supports, ``FLASHTILE_GLUON=0``
never. ``FLASHTILE_GLUON_KERNEL``
picks the kernel: ``ws`` (warp-specialised producer and two consumer
warpgroups, the default), ``pingpong`` (the same with the consumers taking
turns at the tensor cores) or ``simple`` (one partition, TMA ring refilled by
the computing warps). Everything the kernels do not take falls back to the
Triton forward.

The backward's dK/dV kernel (``kernels/gluon_backward.py``: full attention and
causal, GQA included, head dim 64 or 128; the Triton dQ kernel computes dQ and
delta beside it) is opt-in, ``FLASHTILE_GLUON_BWD=1``: it passed its accuracy
and NaN tests on an H100 but ran at 0.74-1.04x the Triton dK/dV kernels' speed
(``benchmarks/tools/gluon_bench.py --backward``). ``FLASHTILE_GLUON_BWD_KERNEL=ws``
picks its warp-specialised form for full attention (tests passed on an H100;
0.83-0.96x the Triton backward there).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import triton

from ....options import AttnOptions
from .device import LOG2E, capability_of, cdiv, scratch_allocator, tma_compatible
from .invariant import batch_invariant

GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.bfloat16, torch.float16)
KERNELS = ("ws", "pingpong", "simple")
# (BLOCK_M, BLOCK_N, STAGES) per head dim; BLOCK_M is the program's query block
# (two warpgroups of BLOCK_M / 2 rows in every kernel)
TILES = {64: (128, 128, 3), 128: (128, 128, 2)}
# full (non-causal) attention takes the Gluon forward by default from this many keys a row
GLUON_MIN_KEYS = {64: 1024, 128: 8192}
# and causal attention
GLUON_CAUSAL_MIN_KEYS = {64: 4096, 128: 1024}
# warp-specialised kernels: registers of the consumer worker and of the producer;
# the default partition (the other consumer) gets what is left of maxnreg
WS_REGS = (240, 24)
WS_MAXNREG = 168


def _kernel_choice() -> str:
    name = os.environ.get("FLASHTILE_GLUON_KERNEL", "ws")
    return name if name in KERNELS else "ws"


def gluon_forward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttnOptions,
                            cu_seqlens_q=None, cu_seqlens_k=None, sparse=None, seqused_k=None, block_table=None,
                            fp8=None) -> bool:
    """True when the Gluon forward computes this call (else the Triton forward does)."""
    choice = os.environ.get("FLASHTILE_GLUON")
    if choice == "0" or not _gluon_importable():
        return False
    if batch_invariant():  # its key tiles are not the Triton forward's: packed calls would differ
        return False
    if capability_of(q.device) != (9, 0):
        return False
    if any(x is not None for x in (cu_seqlens_q, cu_seqlens_k, sparse, seqused_k, block_table, fp8)):
        return False
    if q.dtype not in GLUON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    batch, seqlen_q, nheads, head_dim = q.shape
    if head_dim not in GLUON_HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return False
    if k.shape != v.shape or k.shape[0] != batch or nheads % k.shape[2] != 0:
        return False
    if seqlen_q == 0 or k.shape[1] == 0:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not tma_compatible(q, k, v):
        return False
    causal = opts.window_left < 0 and opts.window_right == 0
    plain = opts.window_left < 0 and opts.window_right < 0
    if not (causal or plain):
        return False
    if (opts.softcap != 0.0 or opts.alibi is not None or opts.bias is not None or opts.dropout_p != 0.0
            or opts.fixed_max is not None or opts.block_mask is not None or opts.sinks is not None):
        return False
    if choice == "1":
        return True
    # by default: where it measured faster (see the module docstring)
    if causal:
        return k.shape[1] >= GLUON_CAUSAL_MIN_KEYS.get(head_dim, 2**62)
    return k.shape[1] >= GLUON_MIN_KEYS[head_dim]


@functools.cache
def _gluon_importable() -> bool:
    """Whether this Triton has Gluon (``triton.experimental.gluon``) with what the kernels use."""
    try:
        importlib.import_module("..kernels.gluon_forward", __package__)
    except ImportError:
        return False
    return True


def gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                  diag_offset: int | None = None, kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of dense attention with the Gluon kernels; ``diag_offset`` (query
    ``i`` sees keys ``j <= i + diag_offset`` when causal) defaults to flash_attn's
    bottom-right alignment ``seqlen_k - seqlen_q``."""
    from ..kernels import gluon_forward as kernels

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    kernel = kernel or _kernel_choice()
    out = torch.empty_like(q)
    if out.stride(-1) != 1 or not tma_compatible(out):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    block_m, block_n, stages = TILES[head_dim]
    if q.is_cuda:
        # the kernels build their TMA descriptors in a global scratch buffer
        triton.set_allocator(scratch_allocator)
    args = (q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], nheads,
            nheads // nheads_k, seqlen_q, seqlen_k, diag_offset, softmax_scale * LOG2E)
    grid = (cdiv(seqlen_q, block_m), batch * nheads)
    if kernel == "simple":
        kernels.gluon_fwd_simple[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=head_dim, STAGES=stages,
                                       CAUSAL=bool(causal), NUM_WARPS=8, num_warps=8)
    else:
        kernels.gluon_fwd_ws[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=head_dim, STAGES=stages,
                                   CAUSAL=bool(causal), PINGPONG=kernel == "pingpong", CONSUMER_REGS=WS_REGS[0],
                                   PRODUCER_REGS=WS_REGS[1], num_warps=4, maxnreg=WS_MAXNREG)
    return out, lse


def gluon_attention_forward(q, k, v, opts: AttnOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_forward``'s call for the options ``gluon_forward_supported`` accepted."""
    return gluon_forward(q, k, v, opts.softmax_scale, opts.window_right == 0, diag_offset=opts.diag_offset)


# The Gluon dK/dV kernel (kernels/gluon_backward.py): (BLOCK_M, BLOCK_N, STAGES) per head dim,
# BLOCK_N keys a program (two warpgroups of BLOCK_N / 2), query tiles of BLOCK_M rows
BWD_TILES = {64: (64, 128, 3), 128: (64, 128, 2)}


def gluon_backward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                             lse: torch.Tensor, opts: AttnOptions, bias_grad: bool = False, varlen: bool = False,
                             sparse=None, seqused_k=None) -> bool:
    """True when the Gluon dK/dV kernel computes this backward's dK and dV (the Triton dQ
    kernel then computes dQ and delta). Opt-in while its GPU test and timing are owed:
    ``FLASHTILE_GLUON_BWD=1``; full attention or causal (GQA included), head dim 64 or
    128, bf16 / fp16, no other option, on compute capability 9.0."""
    if os.environ.get("FLASHTILE_GLUON_BWD") != "1" or not _gluon_importable():
        return False
    if batch_invariant() or capability_of(q.device) != (9, 0):
        return False
    if varlen or sparse is not None or seqused_k is not None or bias_grad:
        return False
    if q.dtype not in GLUON_DTYPES or any(t.dtype != q.dtype for t in (k, v, dout)):
        return False
    if any(t.dim() != 4 for t in (q, k, v, dout)) or dout.shape != q.shape:
        return False
    batch, seqlen_q, nheads, head_dim = q.shape
    if head_dim not in BWD_TILES or k.shape != v.shape or k.shape[-1] != head_dim:
        return False
    if k.shape[0] != batch or nheads % k.shape[2] != 0 or seqlen_q == 0 or k.shape[1] == 0:
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v, dout)) or not tma_compatible(q, k, v, dout):
        return False
    if lse.dim() != 3 or lse.stride(-1) != 1:
        return False
    if not (opts.window_left < 0 and opts.window_right <= 0):  # full attention or causal
        return False
    return (opts.softcap == 0.0 and opts.alibi is None and opts.bias is None and opts.dropout_p == 0.0
            and opts.fixed_max is None and opts.block_mask is None and opts.sinks is None)


BWD_KERNELS = ("simple", "ws")


def gluon_backward_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                        delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, softmax_scale: float,
                        causal: bool = False, diag_offset: int | None = None, kernel: str | None = None) -> None:
    """Write dK and dV into ``dk`` and ``dv`` (k's shape) with the Gluon kernel; ``lse``
    and ``delta`` (batch, nheads, seqlen_q) fp32, delta as the Triton dQ kernel writes it.
    ``causal``: query ``i`` sees keys ``j <= i + diag_offset`` (default flash_attn's
    bottom-right ``seqlen_k - seqlen_q``). ``dk`` / ``dv`` that TMA cannot write are
    written through buffers. ``kernel`` (default ``FLASHTILE_GLUON_BWD_KERNEL``, else
    ``simple``): ``simple`` (one partition of 8 warps) or ``ws`` (warp-specialised: a
    producer warp and two consumer warpgroups; full attention only, causal calls take
    ``simple``)."""
    from ..kernels import gluon_backward as kernels

    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if diag_offset is None:
        diag_offset = seqlen_k - seqlen_q
    outs = [t if tma_compatible(t) and t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            for t in (dk, dv)]
    block_m, block_n, stages = BWD_TILES[head_dim]
    if q.is_cuda:
        triton.set_allocator(scratch_allocator)
    grid = (cdiv(seqlen_k, block_n), batch * nheads_k)
    group = nheads // nheads_k
    kernel = kernel or os.environ.get("FLASHTILE_GLUON_BWD_KERNEL", "simple")
    if kernel == "ws" and not causal:
        kernels.gluon_bwd_dkdv_ws[grid](
            q, k, v, dout, outs[0], outs[1], lse, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *dout.stride()[:3], *outs[0].stride()[:3], *outs[1].stride()[:3], *lse.stride()[:2], nheads_k, group,
            seqlen_q, seqlen_k, softmax_scale, softmax_scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n,
            HEAD_D=head_dim, STAGES=stages, GQA=group > 1, CONSUMER_REGS=WS_REGS[0], PRODUCER_REGS=WS_REGS[1],
            num_warps=4, maxnreg=WS_MAXNREG)
    else:
        kernels.gluon_bwd_dkdv[grid](
            q, k, v, dout, outs[0], outs[1], lse, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *dout.stride()[:3], *outs[0].stride()[:3], *outs[1].stride()[:3], *lse.stride()[:2], nheads_k, group,
            seqlen_q, seqlen_k, diag_offset, softmax_scale, softmax_scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n,
            HEAD_D=head_dim, STAGES=stages, GQA=group > 1, CAUSAL=bool(causal), NUM_WARPS=8, num_warps=8)
    for out, buffer in zip((dk, dv), outs):
        if buffer is not out:
            out.copy_(buffer)
