"""The attention operators, registered with ``torch.library``.

``flashtile::attn_fwd`` and ``flashtile::attn_bwd`` are custom ops with fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
them, and autograd is attached with ``register_autograd``. Each op picks its
backend by device: the Triton kernels for GPU tensors (and for CPU tensors
when Triton's interpreter is on), the tiled PyTorch path for CPU tensors.

Inputs are in flash_attn layout ``(batch, seqlen, nheads, headdim)`` with a
contiguous last dimension.
"""

from __future__ import annotations

import torch

from ..reference import attention_tiled_backward, attention_tiled_forward
from . import launch


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or launch.interpreting()


@torch.library.custom_op("flashtile::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
             causal_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        # nothing to attend: zeros and LSE -inf (also covers empty batches)
        out = torch.zeros_like(q)
        lse = torch.full((batch, nheads, seqlen_q), float("-inf"), device=q.device, dtype=torch.float32)
        return out, lse
    if _use_triton(q):
        return launch.attention_forward(q, k, v, softmax_scale, causal, causal_offset)
    return attention_tiled_forward(q, k, v, softmax_scale, causal, causal_offset)


@attn_fwd.register_fake
def _(q, k, v, softmax_scale, causal, causal_offset):
    batch, seqlen_q, nheads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("flashtile::attn_bwd", mutates_args=())
def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, softmax_scale: float, causal: bool,
             causal_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if _use_triton(q):
        return launch.attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, causal_offset)
    return attention_tiled_backward(dout, q, k, v, out, lse, softmax_scale, causal, causal_offset)


@attn_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, causal_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, causal_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal, ctx.causal_offset = softmax_scale, causal, causal_offset
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.causal_offset)
    return dq, dk, dv, None, None, None


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
              causal_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention on checked inputs in flash_attn layout. Returns (out, lse)."""
    # the kernels need a contiguous head dim; other strides are read as they are
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return attn_fwd(q, k, v, softmax_scale, causal, causal_offset)
