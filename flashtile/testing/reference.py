"""The test oracle: attention materialised in plain PyTorch, quadratic in memory and
obviously right. Tests and benchmarks compare the kernels against it; nothing
in the library imports it.

* ``attention_ref``: the flash_attn layout ``(batch, seqlen, nheads, headdim)``
  with every option of the kernels.
* ``plain_cosine_sim_attention``: cosine-similarity attention (layout
  ``(batch, nheads, seqlen, headdim)``, the arguments of the
  flash-cosine-sim-attention library).
"""

from __future__ import annotations

import math

import torch

from ..backends.torch_tiled import l2norm_grouped
from ..options import causal_offset_for


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
    sinks: torch.Tensor | None = None,
):
    """Materialised attention, the test oracle.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads % nheads_k == 0``.
        v: ``(batch, seqlen_k, nheads_k, headdim)``, like ``k``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: mask keys after the query, aligned as ``causal_align`` says.
        window_size: ``(left, right)``, -1 for unbounded: query ``i`` sees keys
            ``i + o - left <= j <= i + o + right`` with ``o`` the alignment offset.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: ``(nheads,)`` or ``(batch, nheads)``: adds
            ``-slope * |i + o - j|`` after the softcap.
        attn_bias: float (added) or bool (False = masked), broadcastable to
            ``(batch, nheads, seqlen_q, seqlen_k)``.
        dropout_p: the dropout probability: kept probabilities are scaled by
            ``1 / (1 - dropout_p)``; used only with ``dropout_mask``.
        dropout_mask: bool keep-mask ``(batch, nheads, seqlen_q, seqlen_k)``
            (True = kept), e.g. from ``flashtile.testing.dropout_keep_mask``.
        upcast: compute in fp32 (or ``compute_dtype`` if given, e.g. fp64) and
            return the input dtype; with ``upcast=False`` every step runs in the
            input dtype, which is how the accuracy rule measures PyTorch's own error.
        return_lse: also return the natural-log LSE ``(batch, nheads, seqlen_q)``.
        sinks: ``(nheads,)`` attention-sink logits: a column of the sink's logit is
            appended to every row's scores before the softmax and dropped after
            it (the LSE includes it).

    Rows that see no key give zeros (and LSE ``-inf``, or the sink's logit). A key
    a row does not see adds nothing to it, NaN and Inf in its key and value
    included; a row that sees a non-finite value gets NaN there.
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
    if sinks is not None:
        sink_col = sinks.to(scores.dtype).reshape(1, nheads, 1, 1).expand(batch, nheads, seqlen_q, 1)
        scores = torch.cat([scores, sink_col], dim=-1)
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(torch.isnan(probs), 0.0)  # rows with no key
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_mask is not None:
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1 - dropout_p)
    out = _product_seen(probs, scores[..., :seqlen_k] != float("-inf"), v)
    out = out.to(dtype)
    return (out, lse) if return_lse else out



def _product_seen(probs: torch.Tensor, seen: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` (``(b, h, i, j)`` by ``(b, j, h, d)``) in which a key a row does not see
    (``seen`` False) adds nothing, NaN and Inf in its value included: a position that
    is masked contributes nothing, and a row that sees a non-finite value gets NaN there."""
    bad = ~torch.isfinite(v)
    if not bad.any():
        return torch.einsum("bhij,bjhd->bihd", probs, v)
    out = torch.einsum("bhij,bjhd->bihd", probs, v.masked_fill(bad, 0.0))
    seen_bad = torch.einsum("bhij,bjhd->bihd", seen.to(v.dtype), bad.to(v.dtype))
    return out.masked_fill(seen_bad > 0, float("nan"))


def plain_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1, causal=False, l2norm_qk=True,
                               attn_bias_batch_dim=False, *, compute_dtype: torch.dtype | None = None):
    """Cosine-similarity attention, materialised: ``softmax(scale * l2norm(q) l2norm(k)^T
    + attn_bias) v``. Same arguments as
    ``flashtile.flash_cosine_sim_attention``; quadratic memory.

    Args:
        q (torch.Tensor): ``(b, h, i, d)``, or ``(b*h, i, d)`` with batch and heads
            merged (then k, v are 3-D too and attn_bias is ``(b*h, i, j)``).
        k (torch.Tensor): ``(b, h, j, d)``, or ``(b, j, d)``: one key/value head
            for all query heads.
        v (torch.Tensor): shaped like ``k``.
        mask (torch.Tensor | None): bool ``(b, j)``, True = keep.
        attn_bias (torch.Tensor | None): float ``(h, i, j)``, or ``(b, i, j)`` with
            ``attn_bias_batch_dim``.
        causal (bool): query ``i`` sees keys ``j <= i + seqlen_k - seqlen_q``
            (bottom-right).
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
