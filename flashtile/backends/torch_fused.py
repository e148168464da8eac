"""PyTorch's fused CPU flash attention (``aten::_scaled_dot_product_flash_attention_for_cpu``
and its backward, the kernel PyTorch's own ``scaled_dot_product_attention`` calls on the
CPU) as a backend of flashtile's CPU path.

It serves a call where it computes it exactly as flashtile defines it (see ``fused_mode``):

- ``"plain"``: dense attention, full or causal with flashtile's diagonal at the top-left
  corner (``diag_offset == 0``, where its causal mask and flashtile's agree), GQA; one
  call of the kernel.
- ``"masked"``: windows and causal masks of any alignment, and a boolean mask, given to
  the kernel as an additive mask built for ``CHUNK_ROWS`` query rows at a time
  against the keys those rows see, so memory stays linear in the sequence length.

Everything else (ALiBi, a float bias, softcap, dropout, sinks, fixed offsets,
block-sparse, batch-invariant mode) takes the tiled path (``torch_tiled``), as do calls
whose K or V (and in the backward Q or dO) hold a non-finite value. Tensors are in flash_attn
layout ``(batch, seqlen, nheads, headdim)``; the kernel reads their SDPA-layout views.
"""

from __future__ import annotations

import math

import torch

from ..options import AttnOptions
from .triton.launch.invariant import batch_invariant

# query rows per kernel call in "masked" mode (fewer where the mask of a chunk would pass MASK_ELEMENTS)
CHUNK_ROWS = 256
MASK_ELEMENTS = 1 << 24

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_mode(q: torch.Tensor, v: torch.Tensor, opts: AttnOptions, bias_grad: bool = False) -> str | None:
    """``"plain"``, ``"masked"`` or None (the tiled path) for a dense call on CPU tensors
    (see the module docstring)."""
    if (batch_invariant() or opts.softcap != 0 or opts.dropout_p != 0 or opts.fixed_max is not None
            or opts.block_mask is not None or opts.sinks is not None or bias_grad
            or q.dtype not in _FLOAT_DTYPES or v.shape[-1] != q.shape[-1]):
        return None
    if opts.bias is None and opts.alibi is None and opts.window_left < 0 and (
            opts.window_right < 0 or (opts.window_right == 0 and opts.diag_offset == 0)):
        return "plain"
    if opts.alibi is not None:
        # slopes times distances for every head, chunk by chunk, cost more than the tiled path's tiles
        return None
    if opts.bias is not None and opts.bias.dtype != torch.bool:
        # a float bias is read by the kernel as by the tiled path, and measured no faster at 4k
        return None
    return "masked"


def _sdpa(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """SDPA-layout views ``(batch, nheads, seqlen, headdim)`` of flash-layout tensors."""
    return [t.transpose(1, 2) for t in tensors]


def _finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite (a sum is not finite otherwise; an overflowing sum of
    finite values only sends the call to the tiled path)."""
    return all(math.isfinite(t.sum(dtype=torch.float32).item()) for t in tensors if t.numel())


def _like(result: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``result`` in ``t``'s strides (those ``torch.empty_like(t)`` has), copied only if needed."""
    # a dense t keeps its strides in empty_like: the meta tensor only for the others
    if result.stride() == t.stride() or result.stride() == torch.empty_like(t, device="meta").stride():
        return result
    return torch.empty_like(t).copy_(result)


def may_leak(opts: AttnOptions, last=(), first=()) -> bool:
    """Whether a causal result of the plain kernel call may hold NaN leaked from positions
    a row does not see: its products of the probabilities with V, of dS with K and Q, and
    of P with dO take ``0 * NaN`` (or ``0 * Inf``) there as NaN, so such a call is
    recomputed on the tiled path, where they add nothing. The kernel serves causal calls
    only with seqlen_q == seqlen_k, where the last query row sees every key and key 0 is
    seen by every row: a non-finite value that could leak anywhere makes the last row of
    a tensor in ``last`` (the output, dQ) or the first row of one in ``first`` (dK, dV)
    non-finite; only those rows are summed (a non-finite sum from other causes only costs
    the recomputation)."""
    if opts.window_right < 0:  # full attention: no position is hidden from a row
        return False
    rows = [t[:, -1:] for t in last] + [t[:, :1] for t in first]
    return not all(math.isfinite(r.sum().item()) for r in rows if r.numel())


def plain_forward(q, k, v, opts: AttnOptions):
    """(out, lse) of one kernel call, in the strides the registered op's fake implementation
    promises."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_sdpa(q, k, v), 0.0, opts.window_right == 0, scale=opts.softmax_scale)
    return _like(out.transpose(1, 2), q), lse.contiguous()


def plain_backward(dout, q, k, v, out, lse, opts: AttnOptions, exact_strides: bool = True):
    """(dq, dk, dv) from the kernel's backward, which returns them ``(batch, seqlen, nheads,
    headdim)``-contiguous whatever q, k and v's strides; ``exact_strides`` copies them
    into those of q, k and v (as the registered op's fake implementation promises).
    Eager calls keep them as they come, as PyTorch's own SDPA does: three copies fewer
    for inputs in the SDPA layout."""
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_sdpa(dout, q, k, v, out), lse, 0.0, opts.window_right == 0, scale=opts.softmax_scale)
    grads = tuple(g.transpose(1, 2) for g in grads)
    return tuple(_like(g, t) for t, g in zip((q, k, v), grads)) if exact_strides else grads


def _key_span(m0: int, m1: int, seqlen_k: int, opts: AttnOptions) -> tuple[int, int]:
    """Keys [lo, hi) seen by any of the query rows [m0, m1) through the window."""
    hi = max(0, min(seqlen_k, m1 + opts.diag_offset + opts.window_right)) if opts.window_right >= 0 else seqlen_k
    lo = min(max(0, m0 + opts.diag_offset - opts.window_left), hi) if opts.window_left >= 0 else 0
    return lo, hi


def _chunks(q: torch.Tensor, k: torch.Tensor, opts: AttnOptions):
    """(m0, m1, lo, hi, mask) per chunk of query rows: its rows [m0, m1), the keys [lo, hi)
    they see, and the additive mask of that block in q's dtype, ``(batch|1, nheads|1,
    m1 - m0, hi - lo)`` (-inf where a key is not seen), or None if the block is empty."""
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    seqlen_k = k.shape[1]
    # the broadcast dimensions of the bias stay of size 1 in the mask
    bias = opts.bias
    if bias is not None:
        bias = bias[tuple(slice(0, 1) if st == 0 else slice(None) for st in bias.stride()[:2])]
    per_head = bias is not None and bias.shape[1] > 1
    per_batch = bias is not None and bias.shape[0] > 1
    span = _key_span(0, seqlen_q, seqlen_k, opts)
    width = max(1, min(span[1] - span[0], seqlen_k))
    rows = max(16, min(CHUNK_ROWS, MASK_ELEMENTS // (width * (nheads if per_head else 1)
                                                       * (batch if per_batch else 1))))
    for m0 in range(0, seqlen_q, rows):
        m1 = min(m0 + rows, seqlen_q)
        lo, hi = _key_span(m0, m1, seqlen_k, opts)
        if hi <= lo:
            yield m0, m1, lo, hi, None
            continue
        pos = torch.arange(m0, m1)[:, None] + opts.diag_offset  # the key each row is aligned with
        cols = torch.arange(lo, hi)[None, :]
        mask = torch.zeros(m1 - m0, hi - lo, dtype=q.dtype)
        if bias is not None:
            block = bias[..., m0:m1, lo:hi]
            mask = torch.where(block, mask, float("-inf"))
        if opts.window_right >= 0:
            mask = mask.masked_fill(cols > pos + opts.window_right, float("-inf"))
        if opts.window_left >= 0:
            mask = mask.masked_fill(cols < pos - opts.window_left, float("-inf"))
        while mask.dim() < 4:
            mask = mask[None]
        yield m0, m1, lo, hi, mask


def masked_forward(q, k, v, opts: AttnOptions):
    """(out, lse) from one kernel call per chunk of query rows with its additive mask (see
    ``_chunks``), or None where k or v holds a non-finite value: the kernel adds the mask
    to the scores and multiplies V by the probabilities, so a NaN where a row does not look
    would reach it (the tiled path keeps it out). Rows that see no key: zeros, LSE -inf."""
    if not _finite(k, v):
        return None
    batch, seqlen_q, nheads = q.shape[:3]
    out = torch.zeros_like(q)
    lse = torch.full((batch, nheads, seqlen_q), float("-inf"))
    q_t, k_t, v_t, out_t = _sdpa(q, k, v, out)
    for m0, m1, lo, hi, mask in _chunks(q, k, opts):
        if mask is None:
            continue
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_t[:, :, m0:m1], k_t[:, :, lo:hi], v_t[:, :, lo:hi], 0.0, False, attn_mask=mask,
            scale=opts.softmax_scale)
        out_t[:, :, m0:m1] = o
        # the kernel gives a row whose keys are all masked zeros and LSE 0: flashtile's LSE is -inf
        # (only rows of LSE 0 are looked at in the mask)
        if (l == 0).any():
            l = l.masked_fill((l == 0) & (mask == float("-inf")).all(-1), float("-inf"))
        lse[:, :, m0:m1] = l
    return out, lse


def masked_backward(dout, q, k, v, out, lse, opts: AttnOptions):
    """(dq, dk, dv) in q, k and v's strides, chunk by chunk as ``masked_forward`` (dK and dV
    summed over the chunks in fp32), or None where an input holds a non-finite value (a NaN
    where a row does not look would reach the gradients of other rows through ``0 * NaN``)."""
    if not _finite(dout, q, k, v):
        return None
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    dout_t, q_t, k_t, v_t, out_t = _sdpa(dout, q, k, v, out)
    for m0, m1, lo, hi, mask in _chunks(q, k, opts):
        if mask is None:
            continue
        # rows that see no key: LSE 0 as the kernel wrote it (their probabilities are 0 either way)
        lse_c = lse[:, :, m0:m1]
        lse_c = torch.where(lse_c == float("-inf"), 0.0, lse_c).contiguous()
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_t[:, :, m0:m1], q_t[:, :, m0:m1], k_t[:, :, lo:hi], v_t[:, :, lo:hi], out_t[:, :, m0:m1], lse_c,
            0.0, False, attn_mask=mask, scale=opts.softmax_scale)
        dq[:, m0:m1] = gq.transpose(1, 2)
        dk[:, lo:hi] += gk.transpose(1, 2)
        dv[:, lo:hi] += gv.transpose(1, 2)
    return dq, torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)
