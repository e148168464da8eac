"""What shapes the scores besides q, k and v: ``AttnOptions``, shared by the
ops, the Triton launchers and the tiled PyTorch path, and the conventions of
the two public APIs (causal alignment, default scale)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


def causal_offset_for(seqlen_q: int, seqlen_k: int, align: str) -> int:
    """Query ``i`` is aligned with key ``i + offset`` (causal: sees keys ``j <= i + offset``).

    ``align="bottom_right"`` is flash_attn's convention, ``"top_left"`` PyTorch SDPA's.
    """
    if align == "bottom_right":
        return seqlen_k - seqlen_q
    if align == "top_left":
        return 0
    raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {align!r}")



# FP8 (float8_e4m3fn) inputs: the largest finite value, and the rows of q or k that
# share one scale when scales are per block ("block" scaling, FlashAttention-3's
# block quantisation): descales then have shape (batch, nheads_k, cdiv(seqlen, FP8_SCALE_BLOCK))
FP8_MAX = 448.0
FP8_SCALE_BLOCK = 128


def fp8_descale(amax: torch.Tensor) -> torch.Tensor:
    """The descale of values whose largest magnitude is ``amax`` (fp32): ``amax /
    FP8_MAX``, at least fp32's smallest normal, and 1 where ``amax`` is 0 (an
    all-zero block), so it is always finite and positive. The FP8 kernels compute
    the same in the same order."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(amax > 0, (amax / FP8_MAX).clamp_min(tiny), torch.ones_like(amax))


def empty_output(q: torch.Tensor, head_dim_v: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The attention output's buffer: q's shape with the value head dim ``head_dim_v``, its
    dimensions in q's memory order (``torch.empty_like(q)`` where the head dims agree), in
    ``dtype`` (default q's)."""
    if head_dim_v == q.shape[-1]:
        return torch.empty_like(q, dtype=dtype)
    # outer dimensions by decreasing stride, the head dim innermost
    order = sorted(range(q.dim() - 1), key=lambda i: q.stride(i), reverse=True) + [q.dim() - 1]
    shape = (*q.shape[:-1], head_dim_v)
    buffer = q.new_empty([shape[i] for i in order], dtype=dtype)
    return buffer.permute([order.index(i) for i in range(q.dim())])


def default_scale(head_dim: int) -> float:
    """``1 / sqrt(head_dim)``, the softmax scale when none is given."""
    return 1.0 / math.sqrt(head_dim)


class AttnOptions(NamedTuple):
    """Everything besides q, k, v that shapes the scores; shared by the kernels'
    launcher and the tiled path.

    ``diag_offset``: query ``i`` is aligned with key ``i + diag_offset``; it sees keys
    ``i + diag_offset - window_left <= j <= i + diag_offset + window_right`` (-1 = unbounded;
    causal is ``window_right = 0``). ``alibi``: fp32 ``(batch, nheads)``.
    ``bias``: float (added) or bool (False = masked) view of shape ``(batch,
    nheads, seqlen_q, seqlen_k)`` (stride 0 where broadcast). Dropout element
    ``(b, h, i, j)`` draws at index ``((b + dropout_batch_base) * nheads + h) *
    dropout_rows + i) * dropout_cols + j`` (rows/cols 0 = seqlen_q/seqlen_k).
    ``fixed_max``: an upper bound of every score (natural units, scale and
    bias included), or None. When given, the forward pass uses it as the
    softmax offset instead of a running row max (cosine-similarity
    attention); the results are the same up to rounding.
    ``block_mask``: a ``flashtile.BlockMask`` (block-sparse
    attention), or None: the tiled path then takes the mask's tiles, skips
    the empty ones and masks the partial ones.
    ``sinks``: fp32 ``(nheads,)``, one logit per head (natural units, no
    scale) that joins every row's softmax denominator as a key whose value is
    zero (attention sinks); the LSE includes it. Or None.
    """
    softmax_scale: float
    diag_offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    dropout_batch_base: int = 0
    dropout_rows: int = 0
    dropout_cols: int = 0
    fixed_max: float | None = None
    block_mask: object | None = None
    sinks: torch.Tensor | None = None

