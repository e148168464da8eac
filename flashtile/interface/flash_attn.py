"""flash_attn 2.x compatible functions, layout ``(batch, seqlen, nheads, headdim)``."""

from __future__ import annotations

import torch

from ..backends.torch_tiled import attention_probs
from ..errors import FlashtileValueError
from ..ops.attention import attention, attn_options, dropout_seed, seq_options, varlen_slices
from ..options import causal_offset_for
from .checks import (
    as_max_seqlen,
    check_alibi,
    check_cu_seqlens,
    check_dropout,
    check_qkv,
    check_scale,
    check_softcap,
    check_tensor,
    check_varlen_qkv,
    not_yet,
)

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _window(window_size, causal: bool) -> tuple[int, int]:
    """flash_attn's (left, right) window: a negative side is unbounded; causal sets right = 0."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise FlashtileValueError(f"flashtile: window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = (w if w >= 0 else -1 for w in window_size)
    return left, 0 if causal else right


def _attn_probs(q, k, lse, scale, diag, window, softcap, alibi, dropout_p, seed, varlen=None):
    """``S_dmask`` of flash_attn: the softmax probabilities with dropped entries negated,
    ``(batch, nheads, seqlen_q, seqlen_k)`` (padded to the max lengths for varlen)."""
    with torch.no_grad():
        if varlen is None:
            opts = attn_options(q, k, None, alibi, seed, scale, diag, *window, softcap, dropout_p, False)
            probs, keep = attention_probs(q, k, lse, opts)
            return probs if keep is None else torch.where(keep, probs, -probs)
        cu_q, cu_k, max_q, max_k = varlen
        batch = cu_q.numel() - 1
        opts = attn_options(q, k, None, alibi, seed, scale, 0, *window, softcap, dropout_p, True)
        out = torch.zeros(batch, q.shape[1], max_q, max_k, device=q.device)
        for i, sq, sk in varlen_slices(cu_q, cu_k):
            n_q, n_k = sq.stop - sq.start, sk.stop - sk.start
            probs, keep = attention_probs(q[None, sq], k[None, sk], lse[None, :, sq],
                                          seq_options(opts, i, n_q, n_k, max_q, max_k))
            out[i, :, :n_q, :n_k] = probs[0] if keep is None else torch.where(keep, probs, -probs)[0]
        return out


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
        k: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype and device;
            ``nheads % nheads_k == 0`` (MQA/GQA: query head ``i`` uses kv head
            ``i // (nheads // nheads_k)``). headdim from 1 to 256.
        v: ``(batch, seqlen_k, nheads_k, headdim)``, like ``k``.
        dropout_p: dropout probability on the attention weights (0 in eval).
            The mask comes from a counter-based generator seeded from torch's
            default generator, so it is reproducible under ``torch.manual_seed``
            and the backward pass regenerates it instead of storing it.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: causal mask aligned to the bottom-right corner: query ``i``
            sees keys ``j <= i + seqlen_k - seqlen_q``.
        window_size: ``(left, right)`` sliding window, -1 for unbounded: query
            ``i`` sees keys ``i + seqlen_k - seqlen_q - left <= j <= i +
            seqlen_k - seqlen_q + right``. Tiles outside the band are skipped.
            Any negative side is unbounded, as in flash_attn.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``; adds
            ``-slope * |i + seqlen_k - seqlen_q - j|`` to the scores.
        deterministic: accepted for compatibility; the backward pass is always
            deterministic (no atomics).
        return_attn_probs: also return the LSE ``(batch, nheads, seqlen_q)``
            fp32 (natural log) and ``S_dmask``: ``None`` without dropout, else
            the probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` with
            dropped entries negated (materialised: for testing).

    Returns:
        (torch.Tensor | tuple): ``out`` ``(batch, seqlen_q, nheads, headdim)`` in
            q's dtype, or ``(out, softmax_lse, S_dmask)`` if ``return_attn_probs``.
    """
    check_qkv(q, k, v, _LAYOUT)
    check_dropout("dropout_p", dropout_p)
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    diag = causal_offset_for(q.shape[1], k.shape[1], "bottom_right")
    seed = dropout_seed(dropout_p)
    out, lse = attention(q, k, v, scale, diag, window=window, softcap=float(softcap), alibi=alibi_slopes,
                         dropout_p=float(dropout_p), seed=seed)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        s_dmask = _attn_probs(q, k, lse, scale, diag, window, float(softcap), alibi_slopes, dropout_p, seed)
    return out, lse, s_dmask


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
    """``flash_attn_func`` on a packed ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)``.

    q, k and v are read in place through strides (no copies).
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise FlashtileValueError(f"flashtile: qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
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
    """``flash_attn_func`` with ``kv`` packed as ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    check_tensor("kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise FlashtileValueError(f"flashtile: kv must be (batch, seqlen_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Attention over a batch of sequences of different lengths, packed without padding,
    as ``flash_attn.flash_attn_varlen_func``.

    The arguments not listed below are those of ``flash_attn_func``, applied
    per sequence (causal and ALiBi are aligned to each sequence's bottom-right
    corner).

    Args:
        q: ``(total_q, nheads, headdim)``: the queries of every sequence, one
            after another; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k: ``(total_k, nheads_k, headdim)``, indexed by ``cu_seqlens_k``.
        v: ``(total_k, nheads_k, headdim)``, like ``k``.
        cu_seqlens_q: int32 ``(batch + 1,)``, non-decreasing, starting at 0 and
            ending at ``total_q``; zero-length sequences allowed.
        cu_seqlens_k: int32 ``(batch + 1,)``, the same for the keys (ending at ``total_k``).
        max_seqlen_q: the longest query sequence (an upper bound suffices).
        max_seqlen_k: the longest key sequence (an upper bound suffices).
        block_table: paged keys/values; not supported yet (raises ``NotImplementedError``).

    Returns:
        (torch.Tensor | tuple): ``out`` ``(total_q, nheads, headdim)``, or
            ``(out, softmax_lse, S_dmask)`` with ``softmax_lse`` ``(nheads, total_q)``
            fp32 if ``return_attn_probs``.
    """
    if block_table is not None:
        raise not_yet("paged KV (block_table) in flash_attn_varlen_func")
    check_varlen_qkv(q, k, v)
    max_seqlen_q, max_seqlen_k = as_max_seqlen(max_seqlen_q), as_max_seqlen(max_seqlen_k)
    batch = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    check_dropout("dropout_p", dropout_p)
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    seed = dropout_seed(dropout_p)
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    out, lse = attention(q, k, v, scale, 0, window=window, softcap=float(softcap), alibi=alibi_slopes,
                         dropout_p=float(dropout_p), seed=seed, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        s_dmask = _attn_probs(q, k, lse, scale, 0, window, float(softcap), alibi_slopes, dropout_p, seed,
                              varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, lse, s_dmask


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``flash_attn_varlen_func`` on a packed ``qkv`` of shape ``(total, 3, nheads, headdim)``."""
    check_tensor("qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise FlashtileValueError(f"flashtile: qkv must be (total, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``flash_attn_varlen_func`` with ``kv`` packed as ``(total_k, 2, nheads_k, headdim)``."""
    check_tensor("kv", kv)
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise FlashtileValueError(f"flashtile: kv must be (total_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)

