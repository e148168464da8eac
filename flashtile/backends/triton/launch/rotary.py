"""Launcher of the rotary-embedding kernel."""

from __future__ import annotations

import torch

from ..kernels.rotary import rotary_kernel
from .device import cdiv, next_power_of_2


def rotary_launch(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  offsets: torch.Tensor | int, cu_seqlens: torch.Tensor | None, max_seqlen: int, interleaved: bool,
                  conjugate: bool, same_position: bool = False) -> None:
    """Rotate ``x`` into ``out`` (``out`` may be ``x``: in place). ``x`` is ``(batch,
    seqlen, nheads, d)``, or ``(total, nheads, d)`` with int32 ``cu_seqlens`` and the
    longest sequence ``max_seqlen``; ``offsets`` an int or an int32 ``(batch,)`` tensor
    of first positions; ``same_position``: every token of a sequence at its offset."""
    varlen = cu_seqlens is not None
    if varlen:
        batch, seqlen = cu_seqlens.numel() - 1, max_seqlen
        strides_x, strides_o = (0, *x.stride()[:2]), (0, *out.stride()[:2])
    else:
        batch, seqlen = x.shape[0], x.shape[1]
        strides_x, strides_o = x.stride()[:3], out.stride()[:3]
    nheads, head_dim = x.shape[-2], x.shape[-1]
    half = cos.shape[1]
    per_seq = isinstance(offsets, torch.Tensor)
    block_s = 16 if half >= 64 else 32
    grid = (cdiv(max(seqlen, 1), block_s), batch, nheads)
    rest = head_dim - 2 * half
    rotary_kernel[grid](
        x, out, cos, sin, offsets if per_seq else x, cu_seqlens if varlen else x,
        seqlen, nheads, *strides_x, *strides_o, cos.stride(0), sin.stride(0), 0 if per_seq else int(offsets),
        head_dim, HALF=half, BLOCK_S=block_s, BLOCK_H=max(1, next_power_of_2(half)),
        BLOCK_REST=max(1, next_power_of_2(rest)), INTERLEAVED=interleaved, CONJUGATE=conjugate,
        PER_SEQ_OFFSET=per_seq, IS_VARLEN=varlen, COPY_REST=rest > 0 and out.data_ptr() != x.data_ptr(),
        STEP=0 if same_position else 1, num_warps=4)
