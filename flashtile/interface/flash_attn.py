"""flash_attn 2.x compatible functions, layout ``(batch, seqlen, nheads, headdim)``."""

from __future__ import annotations

import torch

from ..backends.torch_tiled import attention_probs
from ..backends.triton.launch.index_stats import index_stats
from ..errors import FlashtileTypeError, FlashtileValueError
from ..ops.attention import attention, attn_options, dropout_seed, seq_options, varlen_slices
from ..ops.fp8 import attention_fp8
from ..options import causal_offset_for
from .checks import (
    as_max_seqlen,
    check_alibi,
    check_cu_seqlens,
    check_dropout,
    check_fp8_descales,
    check_qkv,
    check_scale,
    check_sinks,
    check_softcap,
    check_tensor,
    check_varlen_qkv,
    is_fp8_call,
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
        cu_q, cu_k, max_q, max_k, seqused_k = varlen
        batch = cu_q.numel() - 1
        opts = attn_options(q, k, None, alibi, seed, scale, 0, *window, softcap, dropout_p, True)
        out = torch.zeros(batch, q.shape[1], max_q, max_k, device=q.device)
        for i, sq, sk in varlen_slices(cu_q, cu_k, seqused_k):
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
    sinks: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
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
        sinks: attention sinks (gpt-oss, StreamingLLM): ``(nheads,)`` fp32 or q's
            dtype, one logit per query head (natural units, not scaled) that joins
            every row's softmax denominator, ``softmax([scores, sink])`` with the
            sink's column then dropped; differentiable. The LSE includes it; a
            row that sees no key gives zeros and LSE ``sink``.
        q_descale: FP8 attention (FlashAttention-3's interface, forward only): with
            q, k, v in ``torch.float8_e4m3fn``, their real values are the stored ones
            times these fp32 descales, ``(batch, nheads_k)`` (the query heads of a
            group share one), or for q and k ``(batch, nheads_k, cdiv(seqlen, 128))``,
            one per 128 rows (block quantisation). Required with FP8 inputs;
            ``flashtile.fp8.quantize_qkv`` makes them.
        k_descale: the keys' descales, as ``q_descale``.
        v_descale: the values' descales, ``(batch, nheads_k)``.
        out_dtype: the output's dtype with FP8 inputs (default bf16).

    Returns:
        (torch.Tensor | tuple): ``out`` ``(batch, seqlen_q, nheads, headdim)`` in
            q's dtype (``out_dtype`` for FP8), or ``(out, softmax_lse, S_dmask)`` if
            ``return_attn_probs``.
    """
    fp8 = is_fp8_call(q, k, v, dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale), out_dtype)
    check_qkv(q, k, v, _LAYOUT, fp8)
    check_dropout("dropout_p", dropout_p)
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    check_sinks(sinks, q.shape[2], q)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    diag = causal_offset_for(q.shape[1], k.shape[1], "bottom_right")
    if fp8:
        if dropout_p > 0:
            raise not_yet("dropout with FP8 (float8_e4m3fn) inputs")
        out_dtype = check_fp8_descales(q_descale, k_descale, v_descale, out_dtype, q.shape[0], k.shape[2],
                                       q.shape[1], k.shape[1], q.device)
        out, lse = attention_fp8(q, k, v, q_descale, k_descale, v_descale, scale, diag, window=window,
                                 softcap=float(softcap), alibi=alibi_slopes, sinks=sinks, out_dtype=out_dtype)
        return (out, lse, None) if return_attn_probs else out
    seed = dropout_seed(dropout_p)
    out, lse = attention(q, k, v, scale, diag, window=window, softcap=float(softcap), alibi=alibi_slopes,
                         dropout_p=float(dropout_p), seed=seed, sinks=sinks)
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
    sinks: torch.Tensor | None = None,
):
    """``flash_attn_func`` on a packed ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)``.

    q, k and v are read in place through strides (no copies).
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise FlashtileValueError(f"flashtile: qkv must be (batch, seqlen, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks)


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
    sinks: torch.Tensor | None = None,
):
    """``flash_attn_func`` with ``kv`` packed as ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    check_tensor("kv", kv)
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise FlashtileValueError(f"flashtile: kv must be (batch, seqlen_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks)


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
    seqused_k: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
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
        block_table: int32 ``(batch, max_pages)``: k and v are then a paged cache
            ``(num_pages, page_size, nheads_k, headdim)`` (any page size),
            sequence ``b``'s key ``j`` in page ``block_table[b, j // page_size]``,
            and ``cu_seqlens_k`` (or ``seqused_k``) gives only each sequence's key
            count: chunked prefill and prefix caching against a serving engine's
            cache. Forward only (``NotImplementedError`` when a gradient is needed).
        seqused_k: int32 ``(batch,)``: sequence ``b`` uses only its first
            ``seqused_k[b]`` keys (of those ``cu_seqlens_k`` gives it); causal and
            windows are aligned to that length. Keys it does not use get zero
            gradients.
        sinks: attention sinks (gpt-oss, StreamingLLM): ``(nheads,)`` fp32 or q's
            dtype, one logit per query head (natural units, not scaled) that joins
            every row's softmax denominator, ``softmax([scores, sink])`` with the
            sink's column then dropped; differentiable. The LSE includes it; a
            row that sees no key gives zeros and LSE ``sink``.
        q_descale: FP8 attention (FlashAttention-3's interface, forward only): with
            q, k, v in ``torch.float8_e4m3fn``, their real values are the stored ones
            times these fp32 descales, ``(batch, nheads_k)`` (``batch`` the sequences) (the query heads of a
            group share one), or for q and k ``(batch, nheads_k, cdiv(max_seqlen, 128))``,
            one per 128 rows of each sequence (block quantisation). Required with FP8 inputs;
            ``flashtile.fp8.quantize_qkv`` makes them.
        k_descale: the keys' descales, as ``q_descale``.
        v_descale: the values' descales, ``(batch, nheads_k)``.
        out_dtype: the output's dtype with FP8 inputs (default bf16).

    Returns:
        (torch.Tensor | tuple): ``out`` ``(total_q, nheads, headdim)``, or
            ``(out, softmax_lse, S_dmask)`` with ``softmax_lse`` ``(nheads, total_q)``
            fp32 if ``return_attn_probs``.
    """
    paged = block_table is not None
    fp8 = is_fp8_call(q, k, v, dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale), out_dtype)
    if paged:
        _check_paged_kv(q, k, v, block_table, fp8)
    else:
        check_varlen_qkv(q, k, v, fp8)
    max_seqlen_q, max_seqlen_k = as_max_seqlen(max_seqlen_q), as_max_seqlen(max_seqlen_k)
    batch = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, paged,
                             seqused_k is not None)
    if seqused_k is not None or paged:
        _check_key_counts(seqused_k, cu_seqlens_k, batch, max_seqlen_k, k, block_table)
    if paged and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)):
        raise not_yet("the backward pass through a paged KV cache (block_table) in flash_attn_varlen_func; "
                      "pass k and v unpaged to train")
    if paged and dropout_p > 0:
        raise not_yet("dropout with a paged KV cache (block_table)")
    check_dropout("dropout_p", dropout_p)
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    check_alibi(alibi_slopes, batch, q.shape[1], q.device)
    check_sinks(sinks, q.shape[1], q)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if fp8:
        if dropout_p > 0:
            raise not_yet("dropout with FP8 (float8_e4m3fn) inputs")
        out_dtype = check_fp8_descales(q_descale, k_descale, v_descale, out_dtype, batch, k.shape[-2],
                                       max_seqlen_q, max_seqlen_k, q.device)
        out, lse = attention_fp8(q, k, v, q_descale, k_descale, v_descale, scale, 0, window=window,
                                 softcap=float(softcap), alibi=alibi_slopes, sinks=sinks, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                 seqused_k=seqused_k, block_table=block_table, out_dtype=out_dtype)
        return (out, lse, None) if return_attn_probs else out
    seed = dropout_seed(dropout_p)
    out, lse = attention(q, k, v, scale, 0, window=window, softcap=float(softcap), alibi=alibi_slopes,
                         dropout_p=float(dropout_p), seed=seed, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                         sinks=sinks, seqused_k=seqused_k, block_table=block_table)
    if not return_attn_probs:
        return out
    s_dmask = None
    if dropout_p > 0:
        s_dmask = _attn_probs(q, k, lse, scale, 0, window, float(softcap), alibi_slopes, dropout_p, seed,
                              varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k))
    return out, lse, s_dmask


def _check_paged_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table, fp8: bool = False) -> None:
    """q ``(total_q, nheads, d)``; k, v paged ``(num_pages, page_size, nheads_k, d / dv)``;
    block_table int32 ``(batch, max_pages)`` on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v), ("block_table", block_table)):
        check_tensor(name, t)
    if q.dim() != 3:
        raise FlashtileValueError(f"flashtile: q must be 3-D (total, nheads, headdim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise FlashtileValueError(f"flashtile: with block_table, {name} must be a paged cache (num_pages, "
                                      f"page_size, nheads_k, headdim), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise FlashtileValueError(f"flashtile: the paged {name} must be contiguous in its last dimension")
    if k.shape[:3] != v.shape[:3]:
        raise FlashtileValueError(f"flashtile: k and v must have one shape but for the head dim, got "
                                  f"{tuple(k.shape)} and {tuple(v.shape)}")
    check_qkv(q.unsqueeze(0), k[:1].flatten(0, 1)[None], v[:1].flatten(0, 1)[None], "(total, nheads, headdim)", fp8)
    if block_table.dtype != torch.int32:
        raise FlashtileTypeError(f"flashtile: block_table must be int32, got {block_table.dtype}")
    if block_table.dim() != 2:
        raise FlashtileValueError(f"flashtile: block_table must be (batch, max_pages), got {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise FlashtileValueError(f"flashtile: block_table is on {block_table.device}, q on {q.device}")


def _check_key_counts(seqused_k, cu_seqlens_k, batch: int, max_seqlen_k: int, k: torch.Tensor, block_table) -> None:
    """seqused_k int32 ``(batch,)`` within each sequence's keys and ``max_seqlen_k``; with a
    block table, every sequence's keys within its row's pages, and those pages in the cache.
    Values are read on the host (skipped while tracing or capturing a CUDA graph)."""
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k)
        if seqused_k.dtype != torch.int32:
            raise FlashtileTypeError(f"flashtile: seqused_k must be int32, got {seqused_k.dtype}")
        if tuple(seqused_k.shape) != (batch,):
            raise FlashtileValueError(f"flashtile: seqused_k must have shape ({batch},), got {tuple(seqused_k.shape)}")
        if seqused_k.device != k.device:
            raise FlashtileValueError(f"flashtile: seqused_k is on {seqused_k.device}, the inputs on {k.device}")
    if block_table is not None and block_table.shape[0] != batch:
        raise FlashtileValueError(f"flashtile: block_table must have one row per sequence ({batch}), got "
                                  f"{block_table.shape[0]}")
    if torch.compiler.is_compiling() or (k.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    given = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    lengths = given if seqused_k is None else seqused_k
    if seqused_k is not None:
        low, over, longest = (int(x) for x in torch.stack([seqused_k.min(), (seqused_k - given).max(),
                                                            seqused_k.max()]).tolist()) if batch else (0, 0, 0)
        if low < 0:
            raise FlashtileValueError(f"flashtile: seqused_k must be >= 0, got {low}")
        if block_table is None and over > 0:
            raise FlashtileValueError("flashtile: seqused_k exceeds the keys cu_seqlens_k gives a sequence "
                                      f"(by {over})")
        if longest > max_seqlen_k:
            raise FlashtileValueError(f"flashtile: max_seqlen_k={max_seqlen_k} is smaller than the longest "
                                      f"seqused_k ({longest})")
    if block_table is not None:
        page_size, capacity = k.shape[1], block_table.shape[1] * k.shape[1]
        s = index_stats(lengths, 0, None, None, block_table, page_size)
        if s["length_max"] > capacity:
            raise FlashtileValueError(f"flashtile: a sequence has {s['length_max']} keys, more than block_table's "
                                      f"{block_table.shape[1]} pages of {page_size} hold")
        if s["page_min"] < 0 or s["page_max"] >= k.shape[0]:
            page = s["page_min"] if s["page_min"] < 0 else s["page_max"]
            raise FlashtileValueError(f"flashtile: block_table names page {page}, the cache has {k.shape[0]} pages")


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
    sinks: torch.Tensor | None = None,
):
    """``flash_attn_varlen_func`` on a packed ``qkv`` of shape ``(total, 3, nheads, headdim)``."""
    check_tensor("qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise FlashtileValueError(f"flashtile: qkv must be (total, 3, nheads, headdim), got shape {tuple(qkv.shape)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, sinks=sinks)


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
    sinks: torch.Tensor | None = None,
):
    """``flash_attn_varlen_func`` with ``kv`` packed as ``(total_k, 2, nheads_k, headdim)``."""
    check_tensor("kv", kv)
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise FlashtileValueError(f"flashtile: kv must be (total_k, 2, nheads_k, headdim), got shape {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, sinks=sinks)

