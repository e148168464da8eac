"""Plain-PyTorch attention: the test oracle and the tiled CPU path.

* :func:`attention_ref` materialises the full score matrix (optionally in fp32
  or fp64): simple, obviously right, quadratic in memory. Tests compare the
  kernels against it.
* :func:`attention_tiled_forward` / :func:`attention_tiled_backward` run the
  FlashAttention algorithm itself with PyTorch tensor ops, one (query-block,
  key-block) tile at a time, so memory grows linearly with sequence length.
  They serve CPU tensors when Triton's interpreter is not in use.
* :func:`plain_cosine_sim_attention`: cosine-similarity attention,
  materialised (layout ``(batch, nheads, seqlen, headdim)``, the arguments
  of the flash-cosine-sim-attention library), the oracle of :func:`flashtile.flash_cosine_sim_attention`.
* :func:`dropout_keep_mask` regenerates the kernels' dropout pattern (the same
  Philox counter-based generator Triton's ``tl.rand`` uses), bit for bit.

The other functions take the flash_attn layout ``(batch, seqlen, nheads, headdim)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["AttnOptions", "attention_probs", "attention_ref", "attention_tiled_forward", "attention_tiled_backward",
           "causal_offset_for", "dropout_keep_mask", "l2norm_grouped", "plain_cosine_sim_attention"]


def causal_offset_for(seqlen_q: int, seqlen_k: int, align: str) -> int:
    """Query ``i`` is aligned with key ``i + offset`` (causal: sees keys ``j <= i + offset``).

    ``align="bottom_right"`` is flash_attn's convention, ``"top_left"`` PyTorch SDPA's.
    """
    if align == "bottom_right":
        return seqlen_k - seqlen_q
    if align == "top_left":
        return 0
    raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {align!r}")


# ---------------------------------------------------------------------------
# Dropout: Philox-4x32-10 on the element's linear index, as Triton's tl.rand
# ---------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values
    ``b`` held in int64 (split in 16-bit halves so nothing overflows)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo
    t = a * b_hi + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def _philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` for int64 ``offsets``: float32 uniforms in [0, 1)."""
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(0xCD9E8D57, c2)
        hi_a, lo_a = _mul32(0xD2511F53, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep_mask(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      rows_per_head: int, cols_per_row: int, dropout_p: float) -> torch.Tensor:
    """Keep-mask (True = kept) of the kernels' dropout for broadcastable int64 index
    tensors ``bh = batch * nheads + head``, ``rows`` (query) and ``cols`` (key)."""
    offsets = (bh * rows_per_head + rows) * cols_per_row + cols
    return _philox_uniform(seed, offsets) >= torch.tensor(dropout_p, dtype=torch.float32)


# ---------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------

def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
    compute_dtype: torch.dtype | None = None,
    return_lse: bool = False,
):
    """Materialised attention, the test oracle.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: mask keys after the query, aligned as ``causal_align`` says.
        window_size: ``(left, right)``, -1 for unbounded: query ``i`` sees keys
            ``i + o - left <= j <= i + o + right`` with ``o`` the alignment offset.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)``: adds
            ``-slope * |i + o - j|`` after the softcap.
        attn_bias: float (added) or bool (False = masked), broadcastable to
            ``(batch, nheads, seqlen_q, seqlen_k)``.
        dropout_p, dropout_mask: bool keep-mask ``(batch, nheads, seqlen_q,
            seqlen_k)``; kept probabilities are scaled by ``1 / (1 - dropout_p)``.
        upcast: compute in fp32 (or ``compute_dtype`` if given, e.g. fp64) and
            return the input dtype; with ``upcast=False`` every step runs in the
            input dtype, which is how the accuracy rule measures PyTorch's own error.
        return_lse: also return the natural-log LSE ``(batch, nheads, seqlen_q)``.

    Rows that see no key give zeros (and LSE ``-inf``).
    """
    dtype = q.dtype
    if upcast:
        cdt = compute_dtype or torch.float32
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if attn_bias is not None and attn_bias.is_floating_point():
            attn_bias = attn_bias.to(cdt)
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    group = nheads // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    scores = torch.einsum("bihd,bjhd->bhij", q * scale, k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    offset = causal_offset_for(seqlen_q, seqlen_k, causal_align)
    rows = torch.arange(seqlen_q, device=q.device)[:, None]
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1, nheads, 1, 1) if alibi_slopes.dim() == 2 else alibi_slopes[:, None, None]
        scores = scores - slopes.to(scores.dtype) * (rows + offset - cols).abs()
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            scores = scores.masked_fill(~attn_bias, float("-inf"))
        else:
            scores = scores + attn_bias
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        scores = scores.masked_fill(cols > rows + offset + right, float("-inf"))
    if left >= 0:
        scores = scores.masked_fill(cols < rows + offset - left, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(torch.isnan(probs), 0.0)  # rows with no key
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# The tiled path
# ---------------------------------------------------------------------------

class AttnOptions(NamedTuple):
    """Everything besides q, k, v that shapes the scores; shared by the kernels'
    launcher and the tiled path.

    ``diag``: query ``i`` is aligned with key ``i + diag``; it sees keys
    ``i + diag - window_left <= j <= i + diag + window_right`` (-1 = unbounded;
    causal is ``window_right = 0``). ``alibi``: fp32 ``(batch, nheads)``.
    ``bias``: float (added) or bool (False = masked) view of shape ``(batch,
    nheads, seqlen_q, seqlen_k)`` (stride 0 where broadcast). Dropout element
    ``(b, h, i, j)`` draws at index ``((b + dropout_batch_base) * nheads + h) *
    dropout_rows + i) * dropout_cols + j`` (rows/cols 0 = seqlen_q/seqlen_k).
    ``fixed_max``: an upper bound of every score (natural units, scale and
    bias included), or None. When given, the forward pass uses it as the
    softmax offset instead of a running row max (cosine-similarity
    attention); the results are the same up to rounding.
    ``block_mask``: a :class:`flashtile.api.block_mask.BlockMask` (block-sparse
    attention), or None: the tiled path then takes the mask's tiles, skips
    the empty ones and masks the partial ones.
    """
    softmax_scale: float
    diag: int = 0
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


def _grouped(t: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """(b, s, h, d) -> (b, h_k, group, s, d) view."""
    b, s, h, d = t.shape
    return t.transpose(1, 2).reshape(b, nheads_k, h // nheads_k, s, d)


def _grouped_f32(t: torch.Tensor, nheads_k: int, transposed: bool = False) -> torch.Tensor:
    """``_grouped(t)`` (``transposed``: with its last two dimensions swapped) as a
    contiguous fp32 copy, so that the tiles' products read their operands in place
    (slices of the strided view were copied for every tile, and a transposed view
    multiplies ~1.6x slower on a CPU than a transposed copy)."""
    g = _grouped(t, nheads_k)
    if transposed:
        g = g.transpose(-1, -2)
    return torch.empty(g.shape, dtype=torch.float32, device=g.device).copy_(g)


def _key_span(m0: int, m1: int, seqlen_k: int, opts: AttnOptions) -> tuple[int, int]:
    """Keys [lo, hi) seen by any of the query rows [m0, m1)."""
    hi = max(0, min(seqlen_k, m1 + opts.diag + opts.window_right)) if opts.window_right >= 0 else seqlen_k
    lo = min(max(0, m0 + opts.diag - opts.window_left), hi) if opts.window_left >= 0 else 0
    return lo, hi


class _Tile:
    """Scores of one (query rows [m0, m1), keys [n0, n1)) tile for all heads,
    shaped (batch, nheads_k, group, m, n) like the grouped tensors."""

    def __init__(self, qk, m0, m1, n0, n1, opts: AttnOptions, nheads_k: int, group: int, allowed=None,
                 scaled: bool = False):
        device = qk.device
        batch = qk.shape[0]
        self.rows = torch.arange(m0, m1, device=device)[:, None]
        self.cols = torch.arange(n0, n1, device=device)[None, :]
        s = qk if scaled else qk * opts.softmax_scale  # scaled: q was multiplied by softmax_scale
        self.tanh = None
        if opts.softcap > 0:
            self.tanh = torch.tanh(s / opts.softcap)
            s = self.tanh * opts.softcap
        if opts.alibi is not None:
            slopes = opts.alibi.float().reshape(batch, nheads_k, group, 1, 1)
            s = s - slopes * (self.rows + opts.diag - self.cols).abs()
        if opts.bias is not None:
            bias = opts.bias.reshape(batch, nheads_k, group, *opts.bias.shape[2:])[..., m0:m1, n0:n1]
            s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.float()
        # window bounds, where they cut the tile (the tiles wholly inside need no mask)
        if opts.window_right >= 0 and n1 - 1 > m0 + opts.diag + opts.window_right:
            right_ok = self.cols <= self.rows + opts.diag + opts.window_right
            allowed = right_ok if allowed is None else allowed & right_ok
        if opts.window_left >= 0 and n0 < m1 - 1 + opts.diag - opts.window_left:
            left_ok = self.cols >= self.rows + opts.diag - opts.window_left
            allowed = left_ok if allowed is None else allowed & left_ok
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        self.scores = s
        self.keep = None
        if opts.dropout_p > 0:
            nheads = nheads_k * group
            bh = ((torch.arange(batch, device=device) + opts.dropout_batch_base) * nheads)[:, None, None, None, None]
            bh = bh + torch.arange(nheads, device=device).reshape(1, nheads_k, group, 1, 1)
            self.keep = dropout_keep_mask(opts.seed, bh, self.rows, self.cols, opts.dropout_rows,
                                          opts.dropout_cols, opts.dropout_p)


def _filled(opts: AttnOptions, seqlen_q: int, seqlen_k: int) -> AttnOptions:
    return opts._replace(dropout_rows=opts.dropout_rows or seqlen_q, dropout_cols=opts.dropout_cols or seqlen_k)


def _sparse_tiles(opts: AttnOptions, block_m: int, block_n: int) -> tuple[int, int]:
    """Tile sizes of the tiled path: the block mask's, if there is one."""
    return opts.block_mask.block_size if opts.block_mask is not None else (block_m, block_n)


def _sparse_allowed(opts: AttnOptions, m0, m1, n0, n1, nheads_k: int, group: int):
    """Block-sparse element mask of a tile, grouped like the scores ``(batch|1,
    nheads_k|1, group|1, m, n)``; None without a block mask; False for an empty tile."""
    mask = opts.block_mask
    if mask is None:
        return None
    bq, bk = mask.block_size
    elems = mask.tile_elements(m0 // bq, n0 // bk)
    if elems is None:
        return False
    b, h = elems.shape[:2]
    elems = elems[..., :m1 - m0, :n1 - n0]
    return elems.reshape(b, 1, 1, m1 - m0, n1 - n0) if h == 1 else elems.reshape(b, nheads_k, group, m1 - m0, n1 - n0)


def attention_tiled_forward(q, k, v, opts: AttnOptions, block_m: int = 128, block_n: int = 256):
    """Tiled forward, memory linear in sequence length. Returns (out, lse) like the kernels:
    out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, lse ``(batch, nheads, seqlen_q)`` fp32."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    opts = _filled(opts, seqlen_q, seqlen_k)
    block_m, block_n = _sparse_tiles(opts, block_m, block_n)
    qg, vg = _grouped_f32(q, nheads_k), _grouped_f32(v, nheads_k)
    k_t = _grouped_f32(k, nheads_k, transposed=True)  # (b, h_k, 1, d, s)
    out_f = torch.empty(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :] * opts.softmax_scale
        m_i = torch.full(qb.shape[:-1], float("-inf") if opts.fixed_max is None else opts.fixed_max,
                         device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(qb.shape, device=q.device)
        lo, hi = _key_span(m0, m1, seqlen_k, opts)
        for n0 in range(lo, hi, block_n):
            n1 = min(n0 + block_n, hi)
            allowed = _sparse_allowed(opts, m0, m1, n0, n1, nheads_k, group)
            if allowed is False:
                continue
            tile = _Tile(qb @ k_t[..., n0:n1], m0, m1, n0, n1, opts, nheads_k, group, allowed, scaled=True)
            s = tile.scores  # a temporary of this tile: exponentiated in place
            if opts.fixed_max is not None:
                # a constant offset bounds every score: no running max, no rescaling
                p = s.sub_(m_i[..., None]).exp_()
                l_i = l_i + p.sum(-1)
            else:
                m_new = torch.maximum(m_i, s.amax(-1))
                m_sub = torch.where(m_new == float("-inf"), 0.0, m_new)
                alpha = torch.exp(m_i - m_sub)
                p = s.sub_(m_sub[..., None]).exp_()
                l_i = l_i * alpha + p.sum(-1)
                acc.mul_(alpha[..., None])
                m_i = m_new
            if tile.keep is not None:
                p = p.masked_fill(~tile.keep, 0.0)
            acc.add_(p @ vg[..., n0:n1, :])
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, 1.0) * (1.0 - opts.dropout_p)
        out_f[..., m0:m1, :] = acc / l_safe[..., None]
        lse[..., m0:m1] = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, 1.0)), float("-inf"))
    out = torch.empty_like(q)  # same memory layout as q, as the kernels give
    out.copy_(out_f.reshape(batch, nheads, seqlen_q, head_dim).transpose(1, 2))
    return out, lse.reshape(batch, nheads, seqlen_q)


def attention_tiled_backward(dout, q, k, v, out, lse, opts: AttnOptions, bias_grad: bool = False,
                             block_m: int = 128, block_n: int = 256):
    """Tiled backward that recomputes the probabilities from LSE. Returns (dq, dk, dv, dbias):
    dbias is the fp32 gradient of ``opts.bias`` before any broadcast reduction,
    ``(batch, nheads, seqlen_q, seqlen_k)``, or None unless ``bias_grad``."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    opts = _filled(opts, seqlen_q, seqlen_k)
    block_m, block_n = _sparse_tiles(opts, block_m, block_n)
    qg, kg, dog = (_grouped_f32(t, nheads_k) for t in (q, k, dout))
    k_t, v_t = (_grouped_f32(t, nheads_k, transposed=True) for t in (k, v))  # (b, h_k, 1, d, s)
    og = _grouped(out, nheads_k)
    lse_g = lse.reshape(batch, nheads_k, group, seqlen_q)
    # a row that saw no key has LSE -inf; +inf makes its probabilities 0
    lse_g = torch.where(lse_g == float("-inf"), float("inf"), lse_g)
    dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kg.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(_grouped(v, nheads_k).shape, dtype=torch.float32, device=q.device)
    dbias = torch.zeros(batch, nheads_k, group, seqlen_q, seqlen_k, device=q.device) if bias_grad else None
    scale_drop = 1.0 / (1.0 - opts.dropout_p)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :]
        qb_scaled = qb * opts.softmax_scale
        dob = dog[..., m0:m1, :]
        delta = (dob * og[..., m0:m1, :].float()).sum(-1, keepdim=True)
        lse_b = lse_g[..., m0:m1, None]
        lo, hi = _key_span(m0, m1, seqlen_k, opts)
        for n0 in range(lo, hi, block_n):
            n1 = min(n0 + block_n, hi)
            allowed = _sparse_allowed(opts, m0, m1, n0, n1, nheads_k, group)
            if allowed is False:
                continue
            kb = kg[..., n0:n1, :]
            tile = _Tile(qb_scaled @ k_t[..., n0:n1], m0, m1, n0, n1, opts, nheads_k, group, allowed, scaled=True)
            p = tile.scores.sub_(lse_b).exp_()  # the scores are a temporary of this tile
            dp = dob @ v_t[..., n0:n1]
            p_drop = p
            if tile.keep is not None:
                p_drop = p.masked_fill(~tile.keep, 0.0) * scale_drop
                dp = dp.masked_fill(~tile.keep, 0.0) * scale_drop
            dv[..., n0:n1, :] += (p_drop.transpose(-1, -2) @ dob).sum(2, keepdim=True)
            ds = p * (dp - delta)
            if dbias is not None:
                dbias[..., m0:m1, n0:n1] = ds
            if tile.tanh is not None:
                ds = ds * (1 - tile.tanh * tile.tanh)
            dq[..., m0:m1, :] += ds @ kb
            dk[..., n0:n1, :] += (ds.transpose(-1, -2) @ qb).sum(2, keepdim=True)

    def back(t, like):
        return t.reshape(batch, -1, t.shape[-2], head_dim).transpose(1, 2).to(like.dtype)

    if dbias is not None:
        dbias = dbias.reshape(batch, nheads, seqlen_q, seqlen_k)
    scale = opts.softmax_scale
    return back(dq * scale, q), back(dk * scale, k), back(dv, v), dbias


def attention_probs(q, k, lse, opts: AttnOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Materialised softmax probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` fp32,
    recomputed from the saved LSE, and the dropout keep-mask (None without
    dropout). For inspection and tests (``return_attn_probs``), not for speed."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    opts = _filled(opts, seqlen_q, seqlen_k)
    qk = _grouped(q, nheads_k).float() @ _grouped(k, nheads_k).float().transpose(-1, -2)
    tile = _Tile(qk, 0, seqlen_q, 0, seqlen_k, opts, nheads_k, group)
    lse = torch.where(lse == float("-inf"), float("inf"), lse).reshape(batch, nheads_k, group, seqlen_q, 1)
    probs = torch.exp(tile.scores - lse).reshape(batch, nheads, seqlen_q, seqlen_k)
    keep = None if tile.keep is None else tile.keep.expand(tile.scores.shape).reshape(probs.shape)
    return probs, keep


# ---------------------------------------------------------------------------
# Cosine-similarity attention, plain PyTorch (layout (batch, nheads, seqlen, headdim))
# ---------------------------------------------------------------------------

def l2norm_grouped(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``t`` with each of the ``groups`` sub-vectors of its last dimension scaled to unit
    l2 norm, computed in fp32 (or t's dtype if wider) and returned in t's dtype."""
    compute = torch.promote_types(t.dtype, torch.float32)
    x = t.to(compute).unflatten(-1, (groups, t.shape[-1] // groups))
    return torch.nn.functional.normalize(x, dim=-1).flatten(-2).to(t.dtype)


def plain_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1, causal=False, l2norm_qk=True,
                               attn_bias_batch_dim=False, *, compute_dtype: torch.dtype | None = None):
    """Cosine-similarity attention, materialised: ``softmax(scale * l2norm(q) l2norm(k)^T
    + attn_bias) v``. Same arguments as
    :func:`flashtile.flash_cosine_sim_attention`; quadratic memory.

    Args:
        q: ``(b, h, i, d)``, or ``(b*h, i, d)`` with batch and heads merged (then
            k, v are 3-D too and attn_bias is ``(b*h, i, j)``).
        k, v: ``(b, h, j, d)``, or ``(b, j, d)``: one key/value head for all query heads.
        mask: bool ``(b, j)``, True = keep.
        attn_bias: float ``(h, i, j)``, or ``(b, i, j)`` with ``attn_bias_batch_dim``.
        causal: query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q`` (bottom-right).
        compute_dtype: compute in this dtype (e.g. fp64 for tests) and return q's
            dtype; default: every step in q's dtype.

    Rows that see no key give zeros.
    """
    dtype = q.dtype
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
        if attn_bias is not None:
            attn_bias = attn_bias.to(compute_dtype)
    merged = q.dim() == 3
    if merged:
        q, k, v = q[:, None], k[:, None], v[:, None]
        attn_bias_batch_dim = True
    elif k.dim() == 3:
        k, v = k[:, None], v[:, None]
    if l2norm_qk:
        q, k = l2norm_grouped(q, groups), l2norm_grouped(k, groups)
    if k.shape[1] not in (1, q.shape[1]):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if attn_bias is not None:
        sim = sim + attn_bias.to(sim.dtype).unsqueeze(1 if attn_bias_batch_dim else 0)
    i, j = sim.shape[-2:]
    if causal:
        future = torch.ones((i, j), device=q.device, dtype=torch.bool).triu(j - i + 1)
        sim = sim.masked_fill(future, float("-inf"))
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = sim.softmax(dim=-1)
    attn = attn.masked_fill(torch.isnan(attn), 0.0)  # rows with no key
    out = torch.einsum("bhij,bhjd->bhid", attn, v).to(dtype)
    return out.squeeze(1) if merged else out
