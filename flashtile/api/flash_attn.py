"""flash_attn 2.x compatible functions, layout ``(batch, seqlen, nheads, headdim)``."""

from __future__ import annotations

import torch

from ..reference import causal_offset_for
from .checks import check_dropout, check_qkv, check_scale, check_tensor, not_yet
from .ops import attention

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _check_unsupported(window_size, softcap, alibi_slopes) -> None:
    if tuple(window_size) != (-1, -1):
        raise not_yet(f"sliding window attention (window_size={tuple(window_size)})")
    if softcap != 0.0:
        raise not_yet(f"softcap (softcap={softcap})")
    if alibi_slopes is not None:
        raise not_yet("ALiBi (alibi_slopes)")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention, as ``flash_attn.flash_attn_func``.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype and device;
            ``nheads % nheads_k == 0`` (MQA/GQA: query head ``i`` uses kv head
            ``i // (nheads // nheads_k)``). headdim from 1 to 256.
        dropout_p: must be 0.0 for now.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: causal mask aligned to the bottom-right corner: query ``i``
            sees keys ``j <= i + seqlen_k - seqlen_q``.
        deterministic: accepted for compatibility; the backward pass is always
            deterministic (no atomics).
        return_attn_probs: also return the LSE ``(batch, nheads, seqlen_q)``
            fp32 (natural log) and ``None`` in place of the dropout pattern.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, or
        ``(out, softmax_lse, None)`` if ``return_attn_probs``.
    """
    check_qkv(q, k, v, _LAYOUT)
    check_dropout("dropout_p", dropout_p)
    _check_unsupported(window_size, softcap, alibi_slopes)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    offset = causal_offset_for(q.shape[1], k.shape[1], "bottom_right")
    out, lse = attention(q, k, v, scale, bool(causal), offset)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` on a packed ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)``.

    q, k and v are read in place through strides (no copies).
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flashtile: qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with ``kv`` packed as ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    check_tensor("kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flashtile: kv must be (batch, seqlen_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs):
    """Variable-length batches (flash_attn's packed ``(total, nheads, headdim)`` form): not built yet."""
    raise not_yet("variable-length attention (flash_attn_varlen_func)")


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    """Variable-length batches with packed qkv: not built yet."""
    raise not_yet("variable-length attention (flash_attn_varlen_qkvpacked_func)")


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs):
    """Variable-length batches with packed kv: not built yet."""
    raise not_yet("variable-length attention (flash_attn_varlen_kvpacked_func)")


def flash_attn_with_kvcache(q, k_cache, v_cache, *args, **kwargs):
    """Attention against a (paged) KV cache for decoding: not built yet."""
    raise not_yet("KV-cache attention (flash_attn_with_kvcache)")
