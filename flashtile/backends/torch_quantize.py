"""FP8 quantisation of q, k or v in PyTorch, for CPU tensors: the same arithmetic as
the Triton kernel (``backends/triton/kernels/quantize.py``), on the whole tensor at
once. Rows are rotated in fp32 (``x @ R`` with R's unnormalised +-1 entries, then
the per-column normalisation), scale blocks are ``FP8_SCALE_BLOCK`` positions of
one (batch, kv head) with all heads of its group, and values are divided by their
descale and rounded to float8_e4m3fn (nearest even), saturated at +-``FP8_MAX``."""

from __future__ import annotations

import torch

from ..options import FP8_MAX, FP8_SCALE_BLOCK, fp8_descale


def rotate_rows(x: torch.Tensor, rotation: torch.Tensor | None, colscale: torch.Tensor | None) -> torch.Tensor:
    """``x`` (any leading dims, head dim last) in fp32, times the rotation."""
    y = x.float()
    if rotation is not None:
        y = torch.matmul(y, rotation) * colscale
    return y


def block_amax(y: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """amax of ``y`` ``(batch, seqlen, nheads, d)`` per scale block: ``(batch, nheads_k,
    cdiv(seqlen, FP8_SCALE_BLOCK))`` fp32."""
    batch, seqlen, nheads, d = y.shape
    per_row = y.abs().reshape(batch, seqlen, nheads_k, (nheads // nheads_k) * d).amax(-1) if y.numel() else \
        y.new_zeros(batch, seqlen, nheads_k)
    blocks = -(-seqlen // FP8_SCALE_BLOCK)
    per_row = torch.nn.functional.pad(per_row.permute(0, 2, 1), (0, blocks * FP8_SCALE_BLOCK - seqlen))
    return per_row.reshape(batch, nheads_k, blocks, FP8_SCALE_BLOCK).amax(-1) if blocks else \
        per_row.new_zeros(batch, nheads_k, 0)


def reduce_amax(amax: torch.Tensor, scaling: str) -> torch.Tensor:
    """Block amaxes ``(batch, nheads_k, blocks)`` reduced to the scaling's scale shape:
    ``(batch, nheads_k)`` for "head" and "tensor" (one value repeated), unchanged for "block"."""
    if scaling == "block":
        return amax
    batch, nheads_k, blocks = amax.shape
    if amax.numel() == 0:  # no rows (or no sequences): the descales of an all-zero block
        return amax.new_zeros(batch, nheads_k)
    if scaling == "head":
        return amax.amax(-1)
    return amax.amax().expand(batch, nheads_k).contiguous()


def quantize_torch(x: torch.Tensor, nheads_k: int, rotation: torch.Tensor | None, colscale: torch.Tensor | None,
                   scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(batch, seqlen, nheads, d)`` as float8_e4m3fn and its fp32 descale
    (shape as ``reduce_amax`` says)."""
    batch, seqlen, nheads, d = x.shape
    y = rotate_rows(x, rotation, colscale)
    descale = fp8_descale(reduce_amax(block_amax(y, nheads_k), scaling))
    if scaling == "block":
        per_row = descale.repeat_interleave(FP8_SCALE_BLOCK, dim=-1)[..., :seqlen].permute(0, 2, 1)
    else:
        per_row = descale[:, None, :].expand(batch, seqlen, nheads_k)
    group = nheads // nheads_k
    per_row = per_row[:, :, :, None, None]  # (batch, seqlen, nheads_k, 1, 1)
    y = y.reshape(batch, seqlen, nheads_k, group, d) / per_row
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(x.shape), descale
