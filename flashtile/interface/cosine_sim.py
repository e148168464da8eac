"""Cosine-similarity attention, fused: ``softmax(scale * l2norm(q) l2norm(k)^T + bias) v``.

The arguments and semantics of the flash-cosine-sim-attention library, layout
``(batch, nheads, seqlen, headdim)``. With l2-normalised queries and keys every
score is at most ``scale * groups``, so the forward kernel uses that fixed
bound as its softmax offset instead of tracking a running row max (no row
max, no rescaling of the partial output per key tile); the LSE it saves is the
exact one, so the backward pass is the ordinary one. Everything runs on the
kernels of ``flashtile.ops.attention``: single-head keys/values are GQA with one
kv head, the key-padding mask is a boolean bias read as one vector per tile,
``attn_bias`` an additive bias with its gradient, all through strides (no
copies besides the normalised q and k).
"""

from __future__ import annotations

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from ..ops.attention import attention
from ..ops.l2norm import l2norm as _l2norm
from .checks import check_qkv, check_tensor

_LAYOUT = "(batch, nheads, seqlen, headdim)"


def _check_groups(groups, head_dim: int | None = None) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise FlashtileValueError(f"flashtile: groups must be an int >= 1, got {groups!r}")
    if head_dim is not None and head_dim % groups != 0:
        raise FlashtileValueError(f"flashtile: groups={groups} must divide the head dim {head_dim}")
    return groups


def l2norm_tensors(*tensors: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, ...]:
    """l2-normalise each tensor over its last dimension, split into ``groups``
    equal sub-vectors (each of unit norm). Computed in fp32, returned in each
    tensor's dtype; differentiable.

    Args:
        tensors: floating-point tensors ``(..., d)``, ``d % groups == 0``.
        groups: number of sub-vectors per vector.

    Returns:
        a tuple of tensors shaped and typed like the inputs.
    """
    if not tensors:
        raise FlashtileValueError("flashtile: l2norm_tensors needs at least one tensor")
    out = []
    for i, t in enumerate(tensors):
        check_tensor(f"tensors[{i}]", t)
        if not t.is_floating_point():
            raise FlashtileTypeError(f"flashtile: tensors[{i}] must be floating point, got {t.dtype}")
        if t.dim() == 0:
            raise FlashtileValueError(f"flashtile: tensors[{i}] must have at least one dimension")
        out.append(_l2norm(t, _check_groups(groups, t.shape[-1])))
    return tuple(out)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise FlashtileTypeError(f"flashtile: {name} must be a bool, got {type(value).__name__}")
    return value


def _bias_view(attn_bias, batch_dim: bool, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device):
    """attn_bias ``(h, i, j)`` or ``(b, i, j)`` (dims of size 1 broadcast) as a 4-D view."""
    check_tensor("attn_bias", attn_bias)
    if not attn_bias.is_floating_point():
        raise FlashtileTypeError(f"flashtile: attn_bias must be a floating point tensor, got {attn_bias.dtype}")
    if attn_bias.device != device:
        raise FlashtileValueError(f"flashtile: attn_bias is on {attn_bias.device}, the inputs on {device}")
    lead, lead_name = (batch, "batch") if batch_dim else (nheads, "heads")
    target = (lead, seqlen_q, seqlen_k)
    if attn_bias.dim() != 3 or any(s not in (1, t) for s, t in zip(attn_bias.shape, target)):
        flag = "attn_bias_batch_dim=True" if batch_dim else "attn_bias_batch_dim=False"
        raise FlashtileValueError(f"flashtile: attn_bias must have shape ({lead_name}, seqlen_q, seqlen_k) = {target} "
                         f"with {flag}, got {tuple(attn_bias.shape)}")
    return attn_bias.unsqueeze(1 if batch_dim else 0)


def flash_cosine_sim_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    scale: float = 8,
    groups: int = 1,
    causal: bool = False,
    l2norm_qk: bool = True,
    attn_bias_batch_dim: bool = False,
) -> torch.Tensor:
    """Cosine-similarity attention ``softmax(scale * l2norm(q) l2norm(k)^T + attn_bias) v``,
    memory linear in the sequence length, forward and backward.

    Args:
        q: ``(b, h, i, d)``; or ``(b*h, i, d)`` with batch and heads merged (then
            k and v are 3-D too, one key/value sequence per row of q, and
            ``attn_bias`` is ``(b*h, i, j)``). fp16, bf16 or fp32; ``d`` 1..256.
        k: ``(b, h_k, j, d)`` with ``h % h_k == 0`` (``h_k = h`` usually), or
            ``(b, j, d)``: a single key/value head shared by all query heads.
            ``j`` may differ from ``i`` (cross attention).
        v: shaped like ``k``.
        mask: bool ``(b, j)``, True = attend (key padding).
        attn_bias: float ``(h, i, j)``, or ``(b, i, j)`` with
            ``attn_bias_batch_dim=True``, added to the scores; gets its
            gradient. Combined with ``mask`` it is materialised as a
            ``(b, h, i, j)`` tensor (``(b, i, j)`` with the batch dim).
        scale: the fixed temperature (8 to 16 are usual). In fp16 the fixed
            softmax offset needs ``scale * groups`` (plus the largest bias) at
            most about 10, so that probabilities from ``-bound`` to ``bound``
            fit fp16's range; above, fp16 inputs use the running row max
            (same results, no overflow). bf16 and fp32 have no such limit.
        groups: l2-normalise q and k over ``d / groups`` sub-vectors; scores are
            then at most ``scale * groups``.
        causal: query ``i`` sees keys ``j <= i + (seqlen_k - seqlen_q)``
            (aligned bottom-right, as for cached keys/values).
        l2norm_qk: False when q and k are already normalised (with the same
            ``groups``), e.g. to apply rotary embeddings in between. The fixed
            softmax offset relies on it: scores must not exceed
            ``scale * groups`` (a small slack from rounding is fine).
        attn_bias_batch_dim: see ``attn_bias``.

    Returns:
        ``(b, h, i, d)`` (``(b*h, i, d)`` for merged q) in q's dtype. A row that
        sees no key (fully masked) is zero.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    merged = q.dim() == 3
    if merged:
        if k.dim() != 3 or v.dim() != 3:
            raise FlashtileValueError("flashtile: with q of shape (batch*heads, seqlen, headdim), k and v must be 3-D too, "
                             f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    elif q.dim() != 4:
        raise FlashtileValueError(f"flashtile: q must be 4-D {_LAYOUT} or 3-D (batch*heads, seqlen, headdim), "
                         f"got shape {tuple(q.shape)}")
    elif k.dim() != v.dim() or k.dim() not in (3, 4):
        raise FlashtileValueError(f"flashtile: k and v must both be 4-D {_LAYOUT} or both 3-D (batch, seqlen, headdim), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    l2norm_qk = _check_flag("l2norm_qk", l2norm_qk)
    causal = _check_flag("causal", causal)
    attn_bias_batch_dim = _check_flag("attn_bias_batch_dim", attn_bias_batch_dim) or merged
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise FlashtileTypeError(f"flashtile: scale must be a float, got {type(scale).__name__}")
    if not abs(scale) < float("inf"):
        raise FlashtileValueError(f"flashtile: scale must be finite, got {scale!r}")
    # flash_attn layout views (batch, seqlen, nheads, headdim), no copies
    qf = q.unsqueeze(2) if merged else q.transpose(1, 2)
    kf, vf = (t.unsqueeze(2) if t.dim() == 3 else t.transpose(1, 2) for t in (k, v))
    check_qkv(qf, kf, vf, _LAYOUT)
    _check_groups(groups, q.shape[-1])
    if l2norm_qk:
        qn, kn = l2norm_tensors(q, k, groups=groups)
        qf = qn.unsqueeze(2) if merged else qn.transpose(1, 2)
        kf = kn.unsqueeze(2) if kn.dim() == 3 else kn.transpose(1, 2)
    batch, seqlen_q, nheads, _ = qf.shape
    seqlen_k = kf.shape[1]

    bias = None
    if attn_bias is not None:
        bias = _bias_view(attn_bias, attn_bias_batch_dim, batch, nheads, seqlen_q, seqlen_k, q.device)
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise FlashtileTypeError(f"flashtile: mask must be a bool tensor (True = attend), got {mask.dtype}")
        if tuple(mask.shape) != (batch, seqlen_k):
            raise FlashtileValueError(f"flashtile: mask must have shape (batch, seqlen_k) = {(batch, seqlen_k)}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise FlashtileValueError(f"flashtile: mask is on {mask.device}, the inputs on {q.device}")
        mask4 = mask[:, None, None, :]
        bias = mask4 if bias is None else torch.where(mask4, bias, float("-inf"))

    out, _ = attention(qf, kf, vf, float(scale), seqlen_k - seqlen_q, window=(-1, 0 if causal else -1), bias=bias,
                       fixed_max=abs(float(scale)) * groups)
    return out.squeeze(2) if merged else out.transpose(1, 2)
