"""Plain-PyTorch attention: the test oracle and the tiled CPU path.

* :func:`attention_ref` materialises the full score matrix (optionally in fp32
  or fp64): simple, obviously right, quadratic in memory. Tests compare the
  kernels against it.
* :func:`attention_tiled_forward` / :func:`attention_tiled_backward` run the
  FlashAttention algorithm itself with PyTorch tensor ops, one (query-block,
  key-block) tile at a time, so memory grows linearly with sequence length.
  They serve CPU tensors when Triton's interpreter is not in use.

All functions take the flash_attn layout ``(batch, seqlen, nheads, headdim)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_ref", "attention_tiled_forward", "attention_tiled_backward", "causal_offset_for"]


def causal_offset_for(seqlen_q: int, seqlen_k: int, align: str) -> int:
    """Query ``i`` sees key ``j`` iff ``j <= i + offset``.

    ``align="bottom_right"`` is flash_attn's convention, ``"top_left"`` PyTorch SDPA's.
    """
    if align == "bottom_right":
        return seqlen_k - seqlen_q
    if align == "top_left":
        return 0
    raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {align!r}")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    causal_align: str = "bottom_right",
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
    seqlen_q, seqlen_k, nheads, head_dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    group = nheads // k.shape[2]
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    scores = torch.einsum("bihd,bjhd->bhij", q * scale, k)
    if causal:
        offset = causal_offset_for(seqlen_q, seqlen_k, causal_align)
        rows = torch.arange(seqlen_q, device=q.device)[:, None]
        cols = torch.arange(seqlen_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + offset, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(torch.isnan(probs), 0.0)  # rows with no key
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


def _grouped(t: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """(b, s, h, d) -> (b, h_k, group, s, d) view."""
    b, s, h, d = t.shape
    return t.transpose(1, 2).reshape(b, nheads_k, h // nheads_k, s, d)


def _tile_mask(m0: int, m1: int, n0: int, n1: int, causal: bool, causal_offset: int, device) -> torch.Tensor | None:
    """Boolean (m, n) mask of attended pairs, or None if the whole tile is attended."""
    if not causal or n1 - 1 <= m0 + causal_offset:
        return None
    rows = torch.arange(m0, m1, device=device)[:, None]
    cols = torch.arange(n0, n1, device=device)[None, :]
    return cols <= rows + causal_offset


def _key_end(m1: int, seqlen_k: int, causal: bool, causal_offset: int) -> int:
    return max(0, min(seqlen_k, m1 + causal_offset)) if causal else seqlen_k


def attention_tiled_forward(q, k, v, softmax_scale: float, causal: bool, causal_offset: int,
                            block_m: int = 128, block_n: int = 256):
    """Tiled forward, memory linear in sequence length. Returns (out, lse) like the kernels:
    out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, lse ``(batch, nheads, seqlen_q)`` fp32."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    qg, kg, vg = _grouped(q, nheads_k), _grouped(k, nheads_k), _grouped(v, nheads_k)
    out_f = torch.empty(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :].float() * softmax_scale
        m_i = torch.full(qb.shape[:-1], float("-inf"), device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(qb.shape, device=q.device)
        for n0 in range(0, _key_end(m1, seqlen_k, causal, causal_offset), block_n):
            n1 = min(n0 + block_n, seqlen_k)
            s = qb @ kg[..., n0:n1, :].float().transpose(-1, -2)
            mask = _tile_mask(m0, m1, n0, n1, causal, causal_offset, q.device)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            m_sub = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp(s - m_sub[..., None])
            alpha = torch.exp(m_i - m_sub)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vg[..., n0:n1, :].float()
            m_i = m_new
        seen = l_i > 0
        l_safe = torch.where(seen, l_i, 1.0)
        out_f[..., m0:m1, :] = acc / l_safe[..., None]
        lse[..., m0:m1] = torch.where(seen, m_i + torch.log(l_safe), float("-inf"))
    out = torch.empty_like(q)  # same memory layout as q, as the kernels give
    out.copy_(out_f.reshape(batch, nheads, seqlen_q, head_dim).transpose(1, 2))
    return out, lse.reshape(batch, nheads, seqlen_q)


def attention_tiled_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, causal_offset: int,
                             block_m: int = 128, block_n: int = 256):
    """Tiled backward that recomputes the probabilities from LSE. Returns (dq, dk, dv)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    qg, kg, vg = _grouped(q, nheads_k), _grouped(k, nheads_k), _grouped(v, nheads_k)
    dog, og = _grouped(dout, nheads_k), _grouped(out, nheads_k)
    lse_g = lse.reshape(batch, nheads_k, group, seqlen_q)
    # a row that saw no key has LSE -inf; +inf makes its probabilities 0
    lse_g = torch.where(lse_g == float("-inf"), float("inf"), lse_g)
    dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kg.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(vg.shape, dtype=torch.float32, device=q.device)
    for m0 in range(0, seqlen_q, block_m):
        m1 = min(m0 + block_m, seqlen_q)
        qb = qg[..., m0:m1, :].float()
        dob = dog[..., m0:m1, :].float()
        delta = (dob * og[..., m0:m1, :].float()).sum(-1, keepdim=True)
        lse_b = lse_g[..., m0:m1, None]
        for n0 in range(0, _key_end(m1, seqlen_k, causal, causal_offset), block_n):
            n1 = min(n0 + block_n, seqlen_k)
            kb, vb = kg[..., n0:n1, :].float(), vg[..., n0:n1, :].float()
            p = torch.exp(qb @ kb.transpose(-1, -2) * softmax_scale - lse_b)
            mask = _tile_mask(m0, m1, n0, n1, causal, causal_offset, q.device)
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            dv[..., n0:n1, :] += (p.transpose(-1, -2) @ dob).sum(2, keepdim=True)
            ds = p * (dob @ vb.transpose(-1, -2) - delta)
            dq[..., m0:m1, :] += ds @ kb
            dk[..., n0:n1, :] += (ds.transpose(-1, -2) @ qb).sum(2, keepdim=True)

    def back(t, like):
        return t.reshape(batch, -1, t.shape[-2], head_dim).transpose(1, 2).to(like.dtype)

    return back(dq * softmax_scale, q), back(dk * softmax_scale, k), back(dv, v)
