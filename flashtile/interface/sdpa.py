"""``torch.nn.functional.scaled_dot_product_attention`` compatible function,
layout ``(batch, nheads, seqlen, headdim)``."""

from __future__ import annotations

import torch

from ..errors import FlashtileValueError
from ..ops.attention import attention, dropout_seed
from ..options import causal_offset_for
from .checks import check_attn_mask, check_dropout, check_qkv, check_scale, check_sinks, check_tensor

_LAYOUT = "(batch, nheads, seqlen, headdim)"


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention with PyTorch SDPA's signature and semantics.

    Args:
        query: ``(batch, nheads, seqlen_q, headdim)`` (or 3-D without the batch
            dimension), fp16, bf16 or fp32.
        key: ``(batch, nheads_k, seqlen_k, headdim)``. ``nheads_k`` must
            equal ``nheads`` unless ``enable_gqa=True`` (then it divides it).
        value: ``(batch, nheads_k, seqlen_k, headdim)``, like ``key``.
        attn_mask: bool (True = attend) or float (added to the scores), any
            shape that broadcasts to ``(batch, nheads, seqlen_q, seqlen_k)``;
            read through strides, never expanded in memory (a key-padding
            mask ``(batch, 1, 1, seqlen_k)`` is read as one vector per tile).
            A float mask that requires grad gets its gradient (computed as a
            ``(batch, nheads, seqlen_q, seqlen_k)`` fp32 buffer, then summed
            over the broadcast dimensions: quadratic memory, like the mask
            itself). Rows with no allowed key output zeros.
        dropout_p: dropout probability on the attention weights, applied
            whenever > 0 as in PyTorch (pass 0.0 in eval).
        is_causal: causal mask aligned to the top-left corner, as PyTorch's:
            query ``i`` sees keys ``j <= i``.
        scale: defaults to ``1 / sqrt(headdim)``.
        sinks: attention sinks, ``(nheads,)`` fp32 or query's dtype: one
            logit per query head that joins every row's softmax denominator
            (as ``flash_attn_func``'s ``sinks``); differentiable.

    Returns:
        ``(batch, nheads, seqlen_q, headdim)`` in query's dtype.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    squeeze = query.dim() == 3 and key.dim() == 3 and value.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    # flash_attn layout views; no copies
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    check_qkv(q, k, v, _LAYOUT)
    if attn_mask is not None:
        if is_causal:
            raise FlashtileValueError("flashtile: pass either attn_mask or is_causal=True, not both")
        attn_mask = check_attn_mask(attn_mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
    check_dropout("dropout_p", dropout_p)
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise FlashtileValueError(f"flashtile: query has {q.shape[2]} heads and key/value {k.shape[2]}; "
                         "pass enable_gqa=True for grouped-query attention")
    check_sinks(sinks, q.shape[2], q)
    softmax_scale = check_scale("scale", scale, q.shape[-1])
    offset = causal_offset_for(q.shape[1], k.shape[1], "top_left")
    seed = dropout_seed(dropout_p)
    out, _ = attention(q, k, v, softmax_scale, offset, window=(-1, 0 if is_causal else -1), bias=attn_mask,
                       dropout_p=float(dropout_p), seed=seed, sinks=sinks)
    out = out.transpose(1, 2)
    return out.squeeze(0) if squeeze else out
