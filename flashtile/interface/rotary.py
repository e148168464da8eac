"""Rotary position embedding with flash_attn's signature
(``flash_attn.layers.rotary.apply_rotary_emb``): one fused Triton pass on a
GPU, forward and backward, dense or packed, in place or not; PyTorch ops on
the CPU."""

from __future__ import annotations

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from ..ops.rotary import ApplyRotary
from .checks import check_tensor


def check_rotary(cos, sin, head_dim: int, names: str = "rotary_cos/rotary_sin") -> None:
    """``cos``/``sin`` ``(seqlen_ro, rotary_dim / 2)`` with ``rotary_dim <= head_dim``."""
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise FlashtileValueError(f"flashtile: {names} must both be (seqlen_ro, rotary_dim / 2), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise FlashtileTypeError(f"flashtile: {names} must be floating point, got {cos.dtype}, {sin.dtype}")
    if not 0 < 2 * cos.shape[1] <= head_dim:
        raise FlashtileValueError(f"flashtile: rotary_dim = 2 * {names.split('/')[0]}.shape[1] = {2 * cos.shape[1]} must be "
                         f"in [2, headdim = {head_dim}]")


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                     inplace: bool = False, seqlen_offsets: int | torch.Tensor = 0,
                     cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Rotary position embedding, as ``flash_attn.layers.rotary.apply_rotary_emb``.

    Args:
        x: ``(batch, seqlen, nheads, headdim)``, or ``(total, nheads, headdim)`` with
            ``cu_seqlens``; any float dtype (fp64 through PyTorch ops).
        cos: ``(seqlen_ro, rotary_dim / 2)``; dims past ``rotary_dim`` of ``x`` are
            left as they are.
        sin: ``(seqlen_ro, rotary_dim / 2)``, like ``cos``.
        interleaved: rotate pairs of neighbouring dims (GPT-J) instead of the two
            halves of the rotary dims (GPT-NeoX).
        inplace: write the result into ``x`` (and return it).
        seqlen_offsets: token ``t`` of sequence ``b`` is at position
            ``seqlen_offsets[b] + t``; an int applies to every sequence.
        cu_seqlens: int32 ``(batch + 1,)`` offsets of the sequences of a packed ``x``.
        max_seqlen: the longest sequence of a packed ``x``.

    Returns:
        (torch.Tensor): ``x`` rotated, a new tensor (or ``x`` itself with ``inplace``).
        Differentiable in ``x``.
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_tensor(name, t)
    packed = cu_seqlens is not None
    if x.dim() != (3 if packed else 4):
        raise FlashtileValueError(f"flashtile: x must be {'(total, nheads, headdim) with cu_seqlens' if packed else '(batch, seqlen, nheads, headdim)'}, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FlashtileTypeError(f"flashtile: x must be floating point, got {x.dtype}")
    check_rotary(cos, sin, x.shape[-1], "cos/sin")
    if cos.device != x.device or sin.device != x.device:
        raise FlashtileValueError(f"flashtile: cos/sin are on {cos.device}/{sin.device}, x on {x.device}")
    if x.stride(-1) != 1:
        if inplace:
            raise FlashtileValueError("flashtile: inplace needs x with a contiguous last dimension")
        x = x.contiguous()
    batch = cu_seqlens.numel() - 1 if packed else x.shape[0]
    if packed:
        check_tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.device != x.device:
            raise FlashtileValueError(f"flashtile: cu_seqlens must be a 1-D int32 tensor on x's device, got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
        if max_seqlen is None:
            raise FlashtileValueError("flashtile: max_seqlen must be given with cu_seqlens")
        max_seqlen = int(max_seqlen)
    offsets, offset = None, 0
    if isinstance(seqlen_offsets, torch.Tensor):
        check_tensor("seqlen_offsets", seqlen_offsets)
        if seqlen_offsets.shape != (batch,) or seqlen_offsets.is_floating_point():
            raise FlashtileValueError(f"flashtile: seqlen_offsets must be an int or an integer tensor (batch = {batch},), got "
                             f"{seqlen_offsets.dtype} {tuple(seqlen_offsets.shape)}")
        offsets = seqlen_offsets.to(device=x.device, dtype=torch.int32)
    else:
        offset = int(seqlen_offsets)
    longest = max_seqlen if packed else x.shape[1]
    if not torch.compiler.is_compiling() and x.numel():
        first = offset if offsets is None else int(offsets.max())
        low = offset if offsets is None else int(offsets.min())
        if low < 0 or first + longest > cos.shape[0]:
            raise FlashtileValueError(f"flashtile: cos/sin have {cos.shape[0]} positions, positions up to "
                             f"{first + longest - 1} are needed (and none below 0)")
    return ApplyRotary.apply(x, cos, sin, offsets, cu_seqlens, offset, max_seqlen or 0, bool(interleaved),
                             bool(inplace))
