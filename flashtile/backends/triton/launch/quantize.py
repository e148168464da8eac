"""Launcher of the FP8 quantisation kernel (``kernels/quantize.py``): one launch for
"block" scaling; for "head" and "tensor" scaling an amax launch, a small PyTorch
reduction of the block amaxes and a quantising launch."""

from __future__ import annotations

import torch

from ....options import FP8_SCALE_BLOCK, fp8_descale
from ...torch_quantize import reduce_amax
from ..kernels.quantize import quantize_kernel
from .device import block_d_of, cdiv, interpreting

_PHASE_AMAX, _PHASE_QUANTIZE, _PHASE_BLOCK = 0, 1, 2


def padded_rotation(rotation: torch.Tensor, colscale: torch.Tensor, block_d: int):
    """The rotation's +-1 matrix as fp32 ``(block_d, block_d)`` and its column scales as
    ``(block_d,)``, zero-padded, contiguous."""
    d = rotation.shape[0]
    r = rotation.new_zeros(block_d, block_d, dtype=torch.float32)
    r[:d, :d] = rotation
    c = colscale.new_zeros(block_d, dtype=torch.float32)
    c[:d] = colscale
    return r, c


def quantize_triton(x: torch.Tensor, nheads_k: int, rotation: torch.Tensor | None, colscale: torch.Tensor | None,
                    scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(batch, seqlen, nheads, d)`` as float8_e4m3fn and its fp32 descale:
    ``(batch, nheads_k, cdiv(seqlen, FP8_SCALE_BLOCK))`` for "block" scaling, else
    ``(batch, nheads_k)``. ``rotation`` (+-1 entries, ``(d, d)``) and ``colscale``
    (``(d,)``) on x's device, or None for no rotation."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, seqlen, nheads, d = x.shape
    group = nheads // nheads_k
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    blocks = cdiv(seqlen, FP8_SCALE_BLOCK)
    block_d = block_d_of(d)
    rotate = rotation is not None
    if rotate and x.dtype == torch.float32 and block_d >= 256 and not interpreting():
        # the fp32 rotation of a 256-wide head (256 KiB) does not fit an SM's shared memory next to
        # the rows: rotate first (fp64 products and sums, rounded once to fp32), then quantise
        x = (x.double() @ rotation.double() * colscale.double()).float()
        rotate = False
    if rotate:
        r, c = padded_rotation(rotation, colscale, block_d)
    else:
        r = c = x  # not read
    interp = interpreting()
    kw = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=max(16, min(128, 8192 // block_d)), SCALE_BLOCK=FP8_SCALE_BLOCK,
              ROTATE=rotate, DOT_FP32=x.dtype == torch.float32 or interp, EXACT=interp,
              num_warps=4 if block_d <= 64 else 8, num_stages=2 if block_d >= 256 else 3)
    grid = (blocks, batch * nheads_k)

    def launch(amax, descale, strides, phase):
        quantize_kernel[grid](x, y, r, c, amax, descale, seqlen, nheads_k, group, *x.stride()[:3], *y.stride()[:3],
                              *strides, PHASE=phase, **kw)

    if scaling == "block":
        descale = torch.ones(batch, nheads_k, blocks, dtype=torch.float32, device=x.device)
        if y.numel():
            launch(descale, descale, (0, 0, 0), _PHASE_BLOCK)
        return y, descale
    amax = torch.zeros(batch, nheads_k, blocks, dtype=torch.float32, device=x.device)
    if y.numel():
        launch(amax, amax, (0, 0, 0), _PHASE_AMAX)
    descale = fp8_descale(reduce_amax(amax, scaling))
    if y.numel():
        launch(amax, descale, (descale.stride(0), descale.stride(1), 0), _PHASE_QUANTIZE)
    return y, descale
