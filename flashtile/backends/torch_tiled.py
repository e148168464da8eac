"""The tiled PyTorch path: the FlashAttention algorithm with PyTorch tensor ops,
one (query-block, key-block) tile at a time, so memory grows linearly with
sequence length. It serves CPU tensors (when Triton's interpreter is not in
use), and gives the materialised probabilities of ``return_attn_probs``.

Tensors take the flash_attn layout ``(batch, seqlen, nheads, headdim)``.
"""

from __future__ import annotations

import torch

from ..options import AttnOptions, empty_output
from .dropout import dropout_keep_mask


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
    hi = max(0, min(seqlen_k, m1 + opts.diag_offset + opts.window_right)) if opts.window_right >= 0 else seqlen_k
    lo = min(max(0, m0 + opts.diag_offset - opts.window_left), hi) if opts.window_left >= 0 else 0
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
            s = s - slopes * (self.rows + opts.diag_offset - self.cols).abs()
        if opts.bias is not None:
            bias = opts.bias.reshape(batch, nheads_k, group, *opts.bias.shape[2:])[..., m0:m1, n0:n1]
            s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.float()
        # window bounds, where they cut the tile (the tiles wholly inside need no mask)
        if opts.window_right >= 0 and n1 - 1 > m0 + opts.diag_offset + opts.window_right:
            right_ok = self.cols <= self.rows + opts.diag_offset + opts.window_right
            allowed = right_ok if allowed is None else allowed & right_ok
        if opts.window_left >= 0 and n0 < m1 - 1 + opts.diag_offset - opts.window_left:
            left_ok = self.cols >= self.rows + opts.diag_offset - opts.window_left
            allowed = left_ok if allowed is None else allowed & left_ok
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        self.allowed = allowed  # None where every position of the tile is seen
        self.scores = s
        self.keep = None
        if opts.dropout_p > 0:
            nheads = nheads_k * group
            bh = ((torch.arange(batch, device=device) + opts.dropout_batch_base) * nheads)[:, None, None, None, None]
            bh = bh + torch.arange(nheads, device=device).reshape(1, nheads_k, group, 1, 1)
            self.keep = dropout_keep_mask(opts.seed, bh, self.rows, self.cols, opts.dropout_rows,
                                          opts.dropout_cols, opts.dropout_p)


def _masked_product(p: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``p @ v`` where a key a row does not see (``allowed`` False, so ``p`` 0) adds nothing
    to it, NaN and Inf in its row of ``v`` included (``0 * NaN`` is NaN): the product runs
    on ``v`` with non-finite values zeroed, and the elements whose sum takes a non-finite
    value the row sees become NaN."""
    if allowed is None or allowed is False:
        return p @ v
    bad = ~torch.isfinite(v)
    if not bad.any():
        return p @ v
    seen_bad = allowed.to(v.dtype) @ bad.to(v.dtype)
    return (p @ v.masked_fill(bad, 0.0)).masked_fill_(seen_bad > 0, float("nan"))


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


def attention_tiled_forward(q, k, v, opts: AttnOptions, block_m: int = 128, block_n: int = 256,
                            fp8_probs: bool = False, out_dtype: torch.dtype | None = None):
    """Tiled forward, memory linear in sequence length. Returns (out, lse) like the kernels:
    out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype (or ``out_dtype``), lse ``(batch,
    nheads, seqlen_q)`` fp32. ``fp8_probs``: the probabilities are rounded to float8_e4m3fn
    before their product with V, as the FP8 kernels do (q, k, v then hold dequantised values)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    opts = _filled(opts, seqlen_q, seqlen_k)
    block_m, block_n = _sparse_tiles(opts, block_m, block_n)
    qg, vg = _grouped_f32(q, nheads_k), _grouped_f32(v, nheads_k)
    k_t = _grouped_f32(k, nheads_k, transposed=True)  # (b, h_k, 1, d, s)
    head_dim_v = v.shape[-1]
    out_f = torch.empty((*qg.shape[:-1], head_dim_v), dtype=torch.float32, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :] * opts.softmax_scale
        if opts.sinks is not None:
            # the sink: a key of score ``sink`` and value zero, seen first
            m_i = opts.sinks.float().reshape(1, nheads_k, group, 1).expand(qb.shape[:-1]).clone()
            l_i = torch.ones_like(m_i)
        else:
            m_i = torch.full(qb.shape[:-1], float("-inf") if opts.fixed_max is None else opts.fixed_max,
                             device=q.device)
            l_i = torch.zeros_like(m_i)
        acc = torch.zeros((*qb.shape[:-1], head_dim_v), device=q.device)
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
            if fp8_probs:
                p = p.to(torch.float8_e4m3fn).float()
            acc.add_(_masked_product(p, vg[..., n0:n1, :], tile.allowed))
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, 1.0) * (1.0 - opts.dropout_p)
        out_f[..., m0:m1, :] = acc / l_safe[..., None]
        lse[..., m0:m1] = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, 1.0)), float("-inf"))
    out = empty_output(q, head_dim_v, out_dtype)  # q's memory layout, as the kernels give
    out.copy_(out_f.reshape(batch, nheads, seqlen_q, head_dim_v).transpose(1, 2))
    return out, lse.reshape(batch, nheads, seqlen_q)


def attention_tiled_backward(dout, q, k, v, out, lse, opts: AttnOptions, bias_grad: bool = False,
                             block_m: int = 128, block_n: int = 256):
    """Tiled backward that recomputes the probabilities from LSE. Returns (dq, dk, dv, dbias,
    dsinks): dbias is the fp32 gradient of ``opts.bias`` before any broadcast reduction,
    ``(batch, nheads, seqlen_q, seqlen_k)``, or None unless ``bias_grad``; dsinks the fp32
    gradient of ``opts.sinks`` ``(nheads,)``, or None without sinks."""
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
    dsinks = None
    if opts.sinks is not None:
        sinks = opts.sinks.float().reshape(1, nheads_k, group, 1, 1)
        dsinks = torch.zeros(nheads_k, group, device=q.device)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :]
        qb_scaled = qb * opts.softmax_scale
        dob = dog[..., m0:m1, :]
        delta = (dob * og[..., m0:m1, :].float()).sum(-1, keepdim=True)
        lse_b = lse_g[..., m0:m1, None]
        if dsinks is not None:
            # the sink's score gradient in each row: P_sink * (0 - delta); rows with delta 0 add nothing
            p_sink = torch.exp(sinks - lse_b)
            dsinks -= torch.where(delta == 0, 0.0, p_sink * delta).sum((0, 3, 4))
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
            if tile.allowed is not None:
                ds = ds.masked_fill(~tile.allowed, 0.0)  # dP of a key not seen may be NaN (0 * NaN)
            if dbias is not None:
                dbias[..., m0:m1, n0:n1] = ds
            if tile.tanh is not None:
                ds = ds * (1 - tile.tanh * tile.tanh)
            dq[..., m0:m1, :] += _masked_product(ds, kb, tile.allowed)
            dk[..., n0:n1, :] += (ds.transpose(-1, -2) @ qb).sum(2, keepdim=True)

    def back(t, like):
        # in the input's own strides, as the ops' fake implementations promise (torch.empty_like)
        return torch.empty_like(like).copy_(t.reshape(batch, -1, t.shape[-2], like.shape[-1]).transpose(1, 2))

    if dbias is not None:
        dbias = dbias.reshape(batch, nheads, seqlen_q, seqlen_k)
    scale = opts.softmax_scale
    if dsinks is not None:
        dsinks = dsinks.reshape(nheads)
    return back(dq * scale, q), back(dk * scale, k), back(dv, v), dbias, dsinks


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


def l2norm_grouped(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``t`` with each of the ``groups`` sub-vectors of its last dimension scaled to unit
    l2 norm, computed in fp32 (or t's dtype if wider) and returned in t's dtype."""
    compute = torch.promote_types(t.dtype, torch.float32)
    x = t.to(compute).unflatten(-1, (groups, t.shape[-1] // groups))
    return torch.nn.functional.normalize(x, dim=-1).flatten(-2).to(t.dtype)


