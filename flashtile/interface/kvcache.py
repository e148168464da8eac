"""Decoding against a key/value cache: ``flash_attn_with_kvcache`` (flash_attn's
signature and semantics), rotary embeddings, and a small ``KVCache`` helper
that owns a contiguous or paged cache, in q's dtype or in FP8
(float8_e4m3fn with fp32 descales, FlashAttention-3's ``k_descale``/``v_descale``).

Inference only: nothing here records gradients.
"""

from __future__ import annotations

import torch

from ..backends.triton.launch.index_stats import index_stats
from ..backends.triton.launch.invariant import SPLIT_KEYS, batch_invariant
from ..errors import FlashtileTypeError, FlashtileValueError
from ..ops.decode import attn_decode, cache_rows
from ..ops.rotary import rotary as rotary_op
from ..options import FP8_MAX
from .checks import (
    SUPPORTED_DTYPES,
    check_alibi,
    check_descale,
    check_device,
    check_scale,
    check_sinks,
    check_softcap,
    check_tensor,
)
from .flash_attn import _window
from .rotary import check_rotary


def _int32_vector(name: str, t, batch: int, device) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise FlashtileTypeError(f"flashtile: {name} must be int32, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise FlashtileValueError(f"flashtile: {name} must have shape ({batch},) (one entry per sequence), "
                         f"got {tuple(t.shape)}")
    if t.device != device:
        raise FlashtileValueError(f"flashtile: {name} is on {t.device}, the inputs on {device}")
    return t.to(torch.int32).contiguous()


FP8_CACHE_DTYPE = torch.float8_e4m3fn
# the other 8-bit float dtypes, refused with a message that names the one supported
_OTHER_FP8 = tuple(getattr(torch, name) for name in ("float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                                     "float8_e8m0fnu") if hasattr(torch, name))


def _check_cache_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype in _OTHER_FP8:
        raise FlashtileTypeError(f"flashtile: {name} has dtype {dtype}; of the 8-bit float types only "
                                 "torch.float8_e4m3fn caches are supported")
    if dtype not in SUPPORTED_DTYPES and dtype != FP8_CACHE_DTYPE:
        raise FlashtileTypeError(f"flashtile: {name} has dtype {dtype}; supported are float16, bfloat16, float32 "
                                 "and (caches only) float8_e4m3fn")


def _check_cache_inputs(q, k_cache, v_cache, k, v, block_table, has_batch_idx: bool):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t)
        if name == "q":
            if t.dtype not in SUPPORTED_DTYPES:
                raise FlashtileTypeError(f"flashtile: q has dtype {t.dtype}; supported are float16, bfloat16 and "
                                         "float32")
        else:
            _check_cache_dtype(name, t.dtype)
        if t.dim() != 4:
            raise FlashtileValueError(f"flashtile: {name} must be 4-D, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise FlashtileValueError(f"flashtile: {name} is on {t.device}, q on {q.device}")
    if k_cache.dtype == FP8_CACHE_DTYPE or v_cache.dtype == FP8_CACHE_DTYPE:
        if k_cache.dtype != v_cache.dtype:
            raise FlashtileTypeError(f"flashtile: k_cache and v_cache must share one dtype, got {k_cache.dtype} and "
                                     f"{v_cache.dtype}")
    elif not q.dtype == k_cache.dtype == v_cache.dtype:
        raise FlashtileTypeError(f"flashtile: q, k_cache, v_cache must share one dtype (or the caches be "
                                 f"float8_e4m3fn), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise FlashtileValueError(f"flashtile: k_cache and v_cache must have one shape but for the head dim, got "
                                  f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    batch, _, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    if nheads_k == 0 or nheads % nheads_k:
        raise FlashtileValueError(f"flashtile: the number of query heads ({nheads}) must be a multiple of the number of "
                         f"key/value heads of the cache ({nheads_k})")
    if k_cache.shape[3] != head_dim:
        raise FlashtileValueError(f"flashtile: q and k_cache must have the same head dim, got {head_dim} and "
                         f"{k_cache.shape[3]}")
    if not 1 <= head_dim <= 256:
        raise FlashtileValueError(f"flashtile: head dim must be between 1 and 256, got {head_dim}")
    if not 1 <= v_cache.shape[3] <= 256:
        raise FlashtileValueError(f"flashtile: v_cache's head dim must be between 1 and 256, got {v_cache.shape[3]}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise FlashtileValueError("flashtile: k_cache and v_cache must be contiguous in their last dimension "
                         "(they are written in place)")
    if block_table is not None:
        check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32:
            raise FlashtileTypeError(f"flashtile: block_table must be int32, got {block_table.dtype}")
        if block_table.dim() != 2 or (block_table.shape[0] != batch and not has_batch_idx):
            raise FlashtileValueError(f"flashtile: block_table must be (batch = {batch}, max_pages), got "
                             f"{tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise FlashtileValueError(f"flashtile: block_table is on {block_table.device}, q on {q.device}")
    elif k_cache.shape[0] < batch and not has_batch_idx:
        raise FlashtileValueError(f"flashtile: k_cache holds {k_cache.shape[0]} sequences, q has {batch}; pass "
                         "cache_batch_idx or a larger cache")
    if (k is None) != (v is None):
        raise FlashtileValueError("flashtile: pass both k and v (new keys and values) or neither")
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            check_tensor(name, t)
            if t.dtype != q.dtype or t.device != q.device:
                raise FlashtileTypeError(f"flashtile: {name} must have q's dtype and device, got {t.dtype} on {t.device}")
            if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != cache.shape[2:]:
                raise FlashtileValueError(f"flashtile: {name} must be (batch = {batch}, seqlen_new, nheads_k = {nheads_k}, "
                                          f"headdim = {cache.shape[3]}), got {tuple(t.shape)}")
        if k.shape[1] != v.shape[1]:
            raise FlashtileValueError(f"flashtile: k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}")
    check_device(q)


def _check_descales(k_descale, v_descale, fp8: bool, batch: int, nheads_k: int, device) -> None:
    """The descales of an fp8 cache: fp32 ``(batch, nheads_k)`` on q's device, given
    exactly when the cache is fp8."""
    for name, t in (("k_descale", k_descale), ("v_descale", v_descale)):
        if not fp8:
            if t is not None:
                raise FlashtileValueError(f"flashtile: {name} is for float8_e4m3fn caches only; this cache is not "
                                          "fp8 (pass None)")
            continue
        if t is None:
            raise FlashtileValueError(f"flashtile: a float8_e4m3fn cache needs {name}, fp32 (batch = {batch}, "
                                      f"nheads_k = {nheads_k}): the real value is the cached value times {name}")
        check_descale(name, t, [(batch, nheads_k)], device, " (batch, nheads_k)")


def _check_values(cache_seqlens, seqlen_new, capacity, leftpad, cache_batch_idx, batch_cache, block_table,
                  num_pages, page_size, rotary_offset, seqlen_ro):
    """Checks of the index tensors' contents (``index_stats``); ``rotary_offset``: the
    last rotated position is ``max(cache_seqlens) + rotary_offset`` (None: no rotary).
    Skipped while tracing or capturing a CUDA graph (no host sync is possible there)."""
    if torch.compiler.is_compiling() or (cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    s = index_stats(cache_seqlens, seqlen_new, leftpad, cache_batch_idx, block_table, page_size)
    checks = [  # (is it wrong?, message)
        (s["seqlen_min"] < 0, f"cache_seqlens must be >= 0, got {s['seqlen_min']}"),
        (s["length_max"] > capacity, f"cache_seqlens + seqlen_new reaches {s['length_max']}, more than the cache "
                                     f"holds ({capacity} keys per sequence"
                                     f"{' through block_table' if block_table is not None else ''})"),
        (s["leftpad_min"] < 0, f"cache_leftpad must be >= 0, got {s['leftpad_min']}"),
        (s["leftpad_over_max"] > 0, f"cache_leftpad exceeds cache_seqlens + seqlen_new by {s['leftpad_over_max']} "
                                    "for some sequence"),
        (s["batch_idx_min"] < 0, f"cache_batch_idx must be >= 0, got {s['batch_idx_min']}"),
        (s["batch_idx_max"] >= batch_cache and cache_batch_idx is not None,
         f"cache_batch_idx must be < {batch_cache} (the cache's batch size), got {s['batch_idx_max']}"),
        (s["page_min"] < 0, f"block_table names page {s['page_min']}"),
        (s["page_max"] >= num_pages and block_table is not None,
         f"block_table names page {s['page_max']}, the cache has {num_pages} pages"),
    ]
    if rotary_offset is not None:
        last = s["seqlen_max"] + rotary_offset
        checks.append((last >= seqlen_ro, f"rotary embedding of position {last} needed; rotary_cos/rotary_sin "
                                          f"have {seqlen_ro} positions"))
    for wrong, message in checks:
        if wrong:
            raise FlashtileValueError("flashtile: " + message)


def quantize_e4m3(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, seqlen, nheads_k, d)`` as float8_e4m3fn for fp32 descales
    ``(batch, nheads_k)``: ``x / descale`` in fp32, saturated to +-448, rounded to the
    nearest value (ties to even)."""
    scaled = x.float() / descale.float()[:, None, :, None]
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_CACHE_DTYPE)


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache_seqlens: torch.Tensor, cache_batch_idx: torch.Tensor | None,
                block_table: torch.Tensor | None, k_descale: torch.Tensor | None = None,
                v_descale: torch.Tensor | None = None) -> None:
    """Write ``k``, ``v`` ``(batch, seqlen_new, nheads_k, d)`` into the caches in place,
    token ``t`` of sequence ``b`` at position ``cache_seqlens[b] + t``; into an fp8
    cache quantised with the descales ``(batch, nheads_k)`` (``quantize_e4m3``)."""
    if k_cache.dtype == FP8_CACHE_DTYPE:
        k, v = quantize_e4m3(k, k_descale), quantize_e4m3(v, v_descale)
    positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)[None, :]
    if block_table is None:
        rows = torch.arange(k.shape[0], device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        index = (rows[:, None].expand_as(positions), positions)
    else:
        page_size = k_cache.shape[1]
        index = (block_table.long().gather(1, positions // page_size), positions % page_size)
    k_cache[index] = k
    v_cache[index] = v


@torch.no_grad()
def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    sinks: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
):
    """Attention of new query tokens against a key/value cache, as
    ``flash_attn.flash_attn_with_kvcache`` (decoding, speculative decoding,
    chunked prefill). Inference only: no gradient.

    The key range of each sequence is split across programs (Flash-Decoding)
    and the parts merged by their log-sum-exp, so a batch of one still
    fills the GPU; the query heads of a GQA group are processed together, so
    the cache is read once per kv head.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32.
        k_cache: contiguous ``(batch_cache, seqlen_cache, nheads_k,
            headdim)``, or paged ``(num_pages, page_size, nheads_k, headdim)``
            with ``block_table``; any page size. Last dim contiguous. In q's
            dtype, or ``torch.float8_e4m3fn`` with ``k_descale`` and
            ``v_descale`` (an FP8 cache; the other 8-bit types are refused).
        v_cache: shaped like ``k_cache``, of its dtype.
        k: optional new keys ``(batch, seqlen_new, nheads_k, headdim)`` in q's
            dtype, written into ``k_cache`` in place at positions
            ``cache_seqlens[b] + t`` (after the rotary embedding), and
            attended to. An FP8 cache stores them quantised: ``k /
            k_descale[b, h]`` in fp32, saturated to +-448, rounded to the
            nearest float8_e4m3fn value (ties to even); the attention reads
            the stored (quantised) keys.
        v: optional new values, shaped like ``k``, written into ``v_cache``
            in the same way.
        rotary_cos: optional ``(seqlen_ro, rotary_dim / 2)``: rotary
            embedding applied to q and the new k at their positions
            (``cache_seqlens[b] + t``; with neither causal nor a window, all
            query tokens at position ``cache_seqlens[b]``, as flash_attn).
        rotary_sin: ``(seqlen_ro, rotary_dim / 2)``, given with ``rotary_cos``.
        cache_seqlens: int or int32 ``(batch,)``: keys already in the cache
            per sequence; None means the whole cache.
        cache_batch_idx: int32 ``(batch,)``: the cache row (or block_table row)
            of each sequence; default ``arange(batch)``.
        cache_leftpad: int32 ``(batch,)``: keys before this index are ignored.
        block_table: int32 ``(batch, max_pages)``: page ``block_table[b, j //
            page_size]`` holds key ``j`` of sequence ``b``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: as ``flash_attn_func``, aligned to the bottom-right
            corner of each sequence's keys.
        window_size: as ``flash_attn_func``, aligned like ``causal``.
        softcap: as ``flash_attn_func``.
        alibi_slopes: as ``flash_attn_func``, aligned like ``causal``.
        rotary_interleaved: rotate pairs of neighbouring dims (True, GPT-J) or
            the two halves of the rotary dims (False, GPT-NeoX).
        num_splits: splits of the key range; 0 chooses from batch, heads,
            cache length and the number of multiprocessors.
        return_softmax_lse: also return the LSE ``(batch, nheads, seqlen_q)`` fp32.
        sinks: attention sinks ``(nheads,)`` fp32 or q's dtype, as
            ``flash_attn_func``'s (the LSE includes them).
        k_descale: for a float8_e4m3fn cache (required there, refused
            otherwise): fp32 ``(batch, nheads_k)``, as FlashAttention-3's:
            the real key is the cached value times ``k_descale[b, h]``,
            ``b`` being the sequence's index in this call (its row of ``q``),
            also where ``cache_batch_idx`` maps it to another cache row.
        v_descale: the same for ``v_cache``.

    Returns:
        (torch.Tensor | tuple): ``out`` ``(batch, seqlen_q, nheads, headdim)``, or
            ``(out, softmax_lse)`` if ``return_softmax_lse``.
    """
    _check_cache_inputs(q, k_cache, v_cache, k, v, block_table, cache_batch_idx is not None)
    batch, seqlen_q, nheads, head_dim = q.shape
    _check_descales(k_descale, v_descale, k_cache.dtype == FP8_CACHE_DTYPE, batch, k_cache.shape[2], q.device)
    seqlen_new = 0 if k is None else k.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if cache_seqlens is None:
        if k is not None:
            raise FlashtileValueError("flashtile: cache_seqlens is needed to append k and v to the cache")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    cache_seqlens = _int32_vector("cache_seqlens", cache_seqlens, batch, q.device)
    if cache_batch_idx is not None:
        cache_batch_idx = _int32_vector("cache_batch_idx", cache_batch_idx, batch, q.device)
    batch_cache = block_table.shape[0] if paged else k_cache.shape[0]
    if paged and cache_batch_idx is not None:
        # each sequence reads the block_table row it names (clamped: checked below, or not at all in a graph)
        block_table = block_table[cache_batch_idx.long().clamp(0, batch_cache - 1)]
    leftpad = None if cache_leftpad is None else _int32_vector("cache_leftpad", cache_leftpad, batch, q.device)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashtileValueError(f"flashtile: num_splits must be an int >= 0 (0 = heuristic), got {num_splits!r}")
    if num_splits > 0 and batch_invariant():
        raise FlashtileValueError(f"flashtile: num_splits must be 0 in batch-invariant mode (each split takes "
                                  f"{SPLIT_KEYS} keys of a sequence), got {num_splits}")
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    check_alibi(alibi_slopes, batch, nheads, q.device)
    check_sinks(sinks, nheads, q)
    scale = check_scale("softmax_scale", softmax_scale, head_dim)
    rotary = rotary_cos is not None or rotary_sin is not None
    rotary_offset = None
    if rotary:
        if rotary_cos is None or rotary_sin is None:
            raise FlashtileValueError("flashtile: pass both rotary_cos and rotary_sin, or neither")
        check_rotary(rotary_cos, rotary_sin, head_dim)
        rotary_offset = max(seqlen_new, seqlen_q if window != (-1, -1) else 1) - 1
    _check_values(cache_seqlens, seqlen_new, capacity, leftpad, cache_batch_idx,
                  batch_cache, block_table, k_cache.shape[0], k_cache.shape[1], rotary_offset,
                  rotary_cos.shape[0] if rotary else 0)

    if rotary:
        # queries from the first new position on; not causal, no window: all at that position
        q = rotary_op(q if q.stride(-1) == 1 else q.contiguous(), rotary_cos, rotary_sin, cache_seqlens, None, 0, 0,
                   bool(rotary_interleaved), False, window == (-1, -1))
        if k is not None:
            k = rotary_op(k if k.stride(-1) == 1 else k.contiguous(), rotary_cos, rotary_sin, cache_seqlens, None, 0,
                       0, bool(rotary_interleaved), False, False)
    if k is not None:
        write_cache(k_cache, v_cache, k, v, cache_seqlens, None if paged else cache_batch_idx, block_table,
                    k_descale, v_descale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out, lse = attn_decode(q, k_cache, v_cache, cache_seqlens, None if paged else cache_batch_idx, block_table,
                           leftpad, alibi_slopes, seqlen_new, scale, window[0], window[1], float(softcap),
                           num_splits, sinks, k_descale, v_descale)
    return (out, lse) if return_softmax_lse else out


class KVCache:
    """The key/value cache of one attention layer for batched decoding,
    contiguous or paged, with its lengths kept on the host and the device.

    Contiguous: ``k_cache``/``v_cache`` are ``(batch, max_seqlen, nheads_k,
    headdim)``. Paged (``page_size`` given): ``(num_pages, page_size,
    nheads_k, headdim)`` and an int32 ``block_table`` ``(batch,
    cdiv(max_seqlen, page_size))``; pages are taken from a free list as
    sequences grow and given back by ``reset``.

    FP8 (``dtype=torch.float8_e4m3fn``): the cache stores keys and values
    quantised, the real value being the stored one times a scale per
    (sequence, kv head), held in ``k_descale``/``v_descale`` (fp32 ``(batch,
    nheads_k)``, the ``flash_attn_with_kvcache`` arguments of the same names);
    ``q``, ``k`` and ``v`` stay fp16, bf16 or fp32. The scales are either
    fixed at construction (``k_scale``/``v_scale``: a float, or one per kv
    head ``(nheads_k,)``, the same for every sequence), or, where not given,
    set by a sequence's first append after it was empty (the prefill: at
    construction or after ``reset``) to the largest magnitude of that
    sequence's new keys (values) per kv head divided by 448, and then kept:
    later tokens larger than that saturate at +-448 times the scale. So a
    prefill of a few tokens calibrates poorly; pass scales when the prompt is
    short or known to be unrepresentative.

    Example::

        cache = KVCache(batch=4, max_seqlen=8192, nheads_k=8, head_dim=128, page_size=16, device="cuda")
        out = cache.attend(q, k_new, v_new, causal=True)   # prefill or one decoding step
    """

    def __init__(self, batch: int, max_seqlen: int, nheads_k: int, head_dim: int, *, page_size: int | None = None,
                 num_pages: int | None = None, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, k_scale: float | torch.Tensor | None = None,
                 v_scale: float | torch.Tensor | None = None):
        for name, value in (("batch", batch), ("max_seqlen", max_seqlen), ("nheads_k", nheads_k),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlashtileValueError(f"flashtile: KVCache {name} must be a positive int, got {value!r}")
        if dtype not in SUPPORTED_DTYPES and dtype != FP8_CACHE_DTYPE:
            only = " (of the 8-bit float types only float8_e4m3fn)" if dtype in _OTHER_FP8 else ""
            raise FlashtileTypeError(f"flashtile: KVCache dtype must be float16, bfloat16, float32 or float8_e4m3fn"
                                     f"{only}, got {dtype}")
        self.fp8 = dtype == FP8_CACHE_DTYPE
        # fp8: the descales (batch, nheads_k), and which of them were given (else set by each prefill)
        self.k_descale = self.v_descale = None
        self._fixed_scales = (k_scale is not None, v_scale is not None)
        if self.fp8:
            self.k_descale = self._scale_tensor("k_scale", k_scale, batch, nheads_k, device)
            self.v_descale = self._scale_tensor("v_scale", v_scale, batch, nheads_k, device)
        elif k_scale is not None or v_scale is not None:
            raise FlashtileValueError(f"flashtile: KVCache k_scale/v_scale are for dtype=torch.float8_e4m3fn, the "
                                      f"cache is {dtype}")
        self.batch, self.max_seqlen = batch, max_seqlen
        self.page_size = page_size
        self.lengths = [0] * batch
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        if page_size is None:
            shape = (batch, max_seqlen, nheads_k, head_dim)
            self.block_table = None
        else:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
                raise FlashtileValueError(f"flashtile: KVCache page_size must be a positive int, got {page_size!r}")
            pages_per_seq = -(-max_seqlen // page_size)
            num_pages = batch * pages_per_seq if num_pages is None else num_pages
            shape = (num_pages, page_size, nheads_k, head_dim)
            self.block_table = torch.zeros(batch, pages_per_seq, dtype=torch.int32, device=device)
            self._pages: list[list[int]] = [[] for _ in range(batch)]
            self._free = list(range(num_pages - 1, -1, -1))
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def _scale_tensor(name, scale, batch, nheads_k, device) -> torch.Tensor:
        """fp32 ``(batch, nheads_k)`` descales from a KVCache scale argument (1 where None)."""
        if scale is None:
            return torch.ones(batch, nheads_k, dtype=torch.float32, device=device)
        if isinstance(scale, torch.Tensor):
            if scale.shape not in ((), (nheads_k,)):
                raise FlashtileValueError(f"flashtile: KVCache {name} must be a float or a tensor of shape (nheads_k = "
                                          f"{nheads_k},), got shape {tuple(scale.shape)}")
            if not scale.is_floating_point():
                raise FlashtileTypeError(f"flashtile: KVCache {name} must be a floating-point tensor, got {scale.dtype}")
            values = scale.detach().to(device=device, dtype=torch.float32)
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            values = torch.tensor(float(scale), dtype=torch.float32, device=device)
        else:
            raise FlashtileTypeError(f"flashtile: KVCache {name} must be a float or a tensor, got "
                                     f"{type(scale).__name__}")
        if not bool(torch.isfinite(values).all() and (values > 0).all()):
            raise FlashtileValueError(f"flashtile: KVCache {name} must be positive and finite")
        return values.expand(batch, nheads_k).contiguous()

    def _calibrate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """fp8: the scales of the sequences that are empty (their prefill), from ``k``, ``v``:
        the largest magnitude per (sequence, kv head) over 448 (1 where it is 0)."""
        if not self.fp8 or k.shape[1] == 0:
            return
        fresh = [b for b, n in enumerate(self.lengths) if n == 0]
        if not fresh:
            return
        with torch.no_grad():
            for fixed, descale, x in zip(self._fixed_scales, (self.k_descale, self.v_descale), (k, v)):
                if fixed:
                    continue
                amax = x.detach().abs().amax(dim=(1, 3)).float()  # (batch, nheads_k)
                scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
                if len(fresh) == self.batch:
                    descale.copy_(scale)
                else:
                    rows = torch.tensor(fresh, device=descale.device)
                    descale[rows] = scale[rows]

    def _reserve(self, new_tokens: int) -> None:
        """Grow every sequence by ``new_tokens``: check the room, take pages."""
        if max(self.lengths) + new_tokens > self.max_seqlen:
            raise FlashtileValueError(f"flashtile: KVCache holds {self.max_seqlen} tokens per sequence; appending "
                             f"{new_tokens} to {max(self.lengths)} does not fit")
        if self.page_size is None:
            return
        changed = False
        for b, length in enumerate(self.lengths):
            needed = -(-(length + new_tokens) // self.page_size)
            while len(self._pages[b]) < needed:
                if not self._free:
                    raise RuntimeError("flashtile: KVCache is out of pages; free sequences with reset(b)")
                self._pages[b].append(self._free.pop())
                changed = True
        if changed:
            width = self.block_table.shape[1]
            rows = [pages + [0] * (width - len(pages)) for pages in self._pages]
            self.block_table.copy_(torch.tensor(rows, dtype=torch.int32))

    def _advance(self, new_tokens: int) -> None:
        self.lengths = [n + new_tokens for n in self.lengths]
        self.cache_seqlens += new_tokens

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``(batch, seqlen_new, nheads_k, headdim)`` after each sequence's tokens."""
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != self.batch or k.shape[2:] != self.k_cache.shape[2:]:
            raise FlashtileValueError(f"flashtile: k and v must both be (batch = {self.batch}, seqlen_new, "
                             f"{', '.join(map(str, self.k_cache.shape[2:]))}), got {tuple(k.shape)}, {tuple(v.shape)}")
        self._reserve(k.shape[1])
        self._calibrate(k, v)
        with torch.no_grad():
            if self.fp8:
                write_cache(self.k_cache, self.v_cache, k, v, self.cache_seqlens, None, self.block_table,
                            self.k_descale, self.v_descale)
            else:
                write_cache(self.k_cache, self.v_cache, k.to(self.k_cache.dtype), v.to(self.v_cache.dtype),
                            self.cache_seqlens, None, self.block_table)
        self._advance(k.shape[1])

    def attend(self, q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, **kwargs):
        """``flash_attn_with_kvcache`` on this cache: append ``k``, ``v`` (if given) and
        attend ``q`` ``(batch, seqlen_q, nheads, headdim)`` to every stored token.
        ``kwargs`` are the other arguments of ``flash_attn_with_kvcache``. With an fp8
        cache, ``q``, ``k`` and ``v`` are fp16, bf16 or fp32 (one dtype); ``k``
        and ``v`` are stored quantised with the cache's scales (set by this call
        for the sequences it prefills, see the class docstring)."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                continue
            wrong_dtype = t.dtype not in SUPPORTED_DTYPES if self.fp8 else t.dtype != self.k_cache.dtype
            if wrong_dtype or t.device != self.k_cache.device:
                holds = "float8_e4m3fn (q, k, v: float16, bfloat16 or float32)" if self.fp8 else self.k_cache.dtype
                raise FlashtileTypeError(f"flashtile: KVCache.attend's {name} is {t.dtype} on {t.device}, the cache "
                                         f"holds {holds} on {self.k_cache.device} (KVCache(..., dtype=, device=))")
        new_tokens = 0 if k is None else k.shape[1]
        self._reserve(new_tokens)
        if k is not None and v is not None:
            self._calibrate(k, v)
        result = flash_attn_with_kvcache(q, self.k_cache, self.v_cache, k, v, cache_seqlens=self.cache_seqlens,
                                         block_table=self.block_table, k_descale=self.k_descale,
                                         v_descale=self.v_descale, **kwargs)
        self._advance(new_tokens)
        return result

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the stored keys and values, ``(batch, max(lengths), nheads_k, headdim)``,
        zero past each sequence's length; of an fp8 cache dequantised (stored value
        times its scale) in fp32."""
        longest = max(self.lengths)
        dtype = torch.float32 if self.fp8 else self.k_cache.dtype
        keys = self.k_cache.new_zeros(self.batch, longest, *self.k_cache.shape[2:], dtype=dtype)
        values = torch.zeros_like(keys)
        for b, length in enumerate(self.lengths):
            for out, cache, descale in ((keys, self.k_cache, self.k_descale), (values, self.v_cache, self.v_descale)):
                rows = cache_rows(cache, b, length, None, self.block_table)
                out[b, :length] = rows if descale is None else rows.float() * descale[b][None, :, None]
        return keys, values

    def reset(self, b: int | None = None) -> None:
        """Empty sequence ``b`` (every sequence if None) and give its pages back; fp8 scales
        not given at construction are set again by the sequence's next append."""
        for i in range(self.batch) if b is None else [b]:
            self.lengths[i] = 0
            self.cache_seqlens[i] = 0
            if self.page_size is not None:
                self._free.extend(reversed(self._pages[i]))
                self._pages[i] = []
