"""Rotary position embedding as ``torch.library`` ops (``flashtile::rotary`` out of
place, ``flashtile::rotary_`` in place) with autograd: the Triton kernel for GPU
tensors (and under Triton's interpreter), PyTorch ops on the CPU.

``x`` is ``(batch, seqlen, nheads, d)``, or packed ``(total, nheads, d)`` with
int32 ``cu_seqlens``; token ``t`` of sequence ``b`` is at position
``offsets[b] + t`` (``offsets`` an int32 ``(batch,)`` tensor, or None for the int
``offset``); ``same_position`` puts every token of a sequence at its offset.
``cos``/``sin`` ``(seqlen_ro, rotary_dim / 2)``; the gradient rotates back
(``conjugate``).
"""

from __future__ import annotations

import torch

from ..backends.triton.launch.device import interpreting
from ..backends.triton.launch.rotary import rotary_launch


def positions_of(x: torch.Tensor, offsets: torch.Tensor | None, offset: int, cu_seqlens: torch.Tensor | None,
                 same_position: bool = False) -> torch.Tensor:
    """The position of every token of ``x``: ``(batch, seqlen)``, or ``(total,)`` packed."""
    if cu_seqlens is None:
        steps = torch.arange(x.shape[1], device=x.device)[None, :] * (0 if same_position else 1)
        first = offset if offsets is None else offsets.long()[:, None]
        return (steps + first).expand(x.shape[0], x.shape[1])
    starts = cu_seqlens.long()
    lengths = starts[1:] - starts[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.shape[0])
    steps = torch.arange(x.shape[0], device=x.device) - starts[seq]
    first = offset if offsets is None else offsets.long()[seq]
    return steps * (0 if same_position else 1) + first


def rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool,
                 conjugate: bool = False) -> torch.Tensor:
    """The rotation with PyTorch ops (in fp32, or x's dtype if wider): ``positions``
    has x's shape without its last two dims."""
    half = cos.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].unsqueeze(-2).to(compute)
    s = sin[positions].unsqueeze(-2).to(compute)
    if conjugate:
        s = -s
    xr = x[..., :2 * half].to(compute)
    if interleaved:  # pairs (0, 1), (2, 3), ... (GPT-J)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:  # halves (GPT-NeoX)
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], dim=-1)


def _use_triton(t: torch.Tensor) -> bool:
    # fp64 keeps its precision in PyTorch ops (the kernel computes in fp32)
    return (t.is_cuda or interpreting()) and t.dtype != torch.float64


def _rotary_into(out: torch.Tensor, x: torch.Tensor, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved,
                 conjugate, same_position) -> None:
    if x.numel() == 0:
        return
    if _use_triton(x):
        rotary_launch(x, out, cos, sin, offset if offsets is None else offsets, cu_seqlens, max_seqlen, interleaved,
                      conjugate, same_position)
    else:
        positions = positions_of(x, offsets, offset, cu_seqlens, same_position)
        out.copy_(rotate_torch(x, cos, sin, positions, interleaved, conjugate))


@torch.library.custom_op("flashtile::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
           cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool, conjugate: bool,
           same_position: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    _rotary_into(out, x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate, same_position)
    return out


@rotary.register_fake
def _(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate, same_position):
    return torch.empty_like(x)


@torch.library.custom_op("flashtile::rotary_", mutates_args=("x",))
def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offsets: torch.Tensor | None,
            cu_seqlens: torch.Tensor | None, offset: int, max_seqlen: int, interleaved: bool, conjugate: bool,
            same_position: bool) -> None:
    _rotary_into(x, x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, conjugate, same_position)


class ApplyRotary(torch.autograd.Function):
    """``x`` rotated (a new tensor, or ``x`` itself with ``inplace``); the gradient
    rotates back. No gradient for cos, sin or the offsets."""

    @staticmethod
    def forward(ctx, x, cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved, inplace):
        args = (cos, sin, offsets, cu_seqlens, offset, max_seqlen, interleaved)
        ctx.save_for_backward(cos, sin, offsets, cu_seqlens)
        ctx.scalars = (offset, max_seqlen, interleaved)
        if inplace:
            rotary_(x, *args, False, False)
            ctx.mark_dirty(x)
            return x
        return rotary(x, *args, False, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin, offsets, cu_seqlens = ctx.saved_tensors
        offset, max_seqlen, interleaved = ctx.scalars
        dx = rotary(grad.contiguous() if grad.stride(-1) != 1 else grad, cos, sin, offsets, cu_seqlens, offset,
                    max_seqlen, interleaved, True, False)
        return dx, None, None, None, None, None, None, None, None
