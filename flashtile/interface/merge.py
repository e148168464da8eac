"""Combining partial attention results by their log-sum-exp.

Attention over a key set split into parts (split-KV decoding, a shared
prefix and per-sequence suffixes, keys spread over GPUs) equals the
LSE-weighted average of the attention over each part:
``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = log(sum_i exp(lse_i))``.
"""

from __future__ import annotations

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from .checks import check_tensor


def _rows_last(lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """LSE laid out like ``out`` without its last dim: (b, h, s) -> (b, s, h); (h, total) -> (total, h)."""
    return lse.transpose(-1, -2) if out.dim() == 4 else lse.transpose(0, 1)


def merge_attention_states(*states):
    """Merge partial attention results exactly (computed in fp32).

    Call as ``merge_attention_states(out_a, lse_a, out_b, lse_b)`` or
    ``merge_attention_states([(out_a, lse_a), (out_b, lse_b), ...])``.

    Each part is a pair ``(out_i, lse_i)``: ``out_i`` ``(batch, seqlen_q,
    nheads, headdim)`` (flash_attn layout) or ``(total_q, nheads, headdim)``
    (varlen), the attention of the queries over one part of the keys, all
    parts alike in shape; ``lse_i`` its natural-log LSE, fp32, ``(batch,
    nheads, seqlen_q)`` or ``(nheads, total_q)``, as ``return_attn_probs=True``
    gives, ``-inf`` where a row saw no key of that part.

    Args:
        *states (torch.Tensor | list): ``out_a, lse_a, out_b, lse_b, ...``, or one
            list of ``(out_i, lse_i)`` pairs.

    Returns:
        out (torch.Tensor): the attention over the union of the parts, in the
            dtype of ``out_a``; zeros in rows that saw no key in any part.
        lse (torch.Tensor): its LSE, fp32, shaped like ``lse_a``; ``-inf`` in
            rows that saw no key in any part.
    """
    if len(states) == 1 and isinstance(states[0], (list, tuple)):
        pairs = [tuple(p) for p in states[0]]
    elif len(states) % 2 == 0 and states:
        pairs = [(states[i], states[i + 1]) for i in range(0, len(states), 2)]
    else:
        raise FlashtileTypeError("flashtile: merge_attention_states takes (out_a, lse_a, out_b, lse_b, ...) "
                        "or a list of (out, lse) pairs")
    if not pairs:
        raise FlashtileValueError("flashtile: merge_attention_states needs at least one (out, lse) pair")
    out0 = pairs[0][0]
    for i, (out, lse) in enumerate(pairs):
        check_tensor(f"out[{i}]", out)
        check_tensor(f"lse[{i}]", lse)
        if out.shape != out0.shape or out.dim() not in (3, 4):
            raise FlashtileValueError(f"flashtile: out[{i}] has shape {tuple(out.shape)}; every part must have the "
                             f"shape of out[0] {tuple(out0.shape)}, 4-D or 3-D (varlen)")
        expected = (out.shape[0], out.shape[2], out.shape[1]) if out.dim() == 4 else (out.shape[1], out.shape[0])
        if tuple(lse.shape) != expected:
            raise FlashtileValueError(f"flashtile: lse[{i}] must have shape {expected} for out of shape "
                             f"{tuple(out.shape)}, got {tuple(lse.shape)}")
    lses = torch.stack([_rows_last(lse.float(), out0) for _, lse in pairs])  # (parts, ..., nheads)
    top = lses.amax(0)
    top_safe = torch.where(torch.isinf(top) & (top < 0), 0.0, top)
    weights = torch.exp(lses - top_safe)                                          # 0 for empty parts
    total = weights.sum(0)
    seen = total > 0
    merged = sum(w[..., None] * out.float() for w, (out, _) in zip(weights, pairs))
    merged = merged / torch.where(seen, total, 1.0)[..., None]
    lse = torch.where(seen, top_safe + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    return merged.to(out0.dtype), _rows_last(lse, out0).contiguous()
