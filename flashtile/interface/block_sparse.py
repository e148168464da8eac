"""Block-sparse attention: attention restricted by a ``BlockMask``.

Tiles the mask marks empty are never loaded nor computed, so time grows with
the number of non-empty tiles. The kernels tile at the mask's block size or a
divisor of it (they are tuned for 128 x 128 and 64 x 64 blocks; any powers
of two from 16 work).
"""

from __future__ import annotations

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from ..masks.block_mask import BlockMask
from ..ops.attention import dropout_seed
from ..ops.block_sparse import _EagerBlockSparse, block_sparse_fwd
from .checks import check_alibi, check_dropout, check_qkv, check_scale, check_sinks, check_softcap, check_tensor

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _check_mask(block_mask, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(block_mask, BlockMask):
        raise FlashtileTypeError(f"flashtile: block_mask must be a flashtile BlockMask, got {type(block_mask).__name__}")
    if (block_mask.seqlen_q, block_mask.seqlen_k) != (q.shape[1], k.shape[1]):
        raise FlashtileValueError(f"flashtile: block_mask is for seqlen_q={block_mask.seqlen_q}, "
                         f"seqlen_k={block_mask.seqlen_k}, the inputs have {q.shape[1]} and {k.shape[1]}")
    b, h = block_mask.shape[:2]
    if b not in (1, q.shape[0]) or h not in (1, q.shape[2]):
        raise FlashtileValueError(f"flashtile: block_mask has (batch, heads) = ({b}, {h}); expected 1 or {q.shape[0]} "
                         f"and 1 or {q.shape[2]} (the query heads)")
    if block_mask.device != q.device:
        raise FlashtileValueError(f"flashtile: block_mask is on {block_mask.device}, the inputs on {q.device}; "
                         "use block_mask.to(device)")


def _run(q, k, v, block_mask: BlockMask, scale: float, softcap: float, alibi, dropout_p: float, sinks=None):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seed = dropout_seed(dropout_p)
    lists = block_mask.kernel_lists()
    fwd = block_sparse_fwd if torch.compiler.is_compiling() else _EagerBlockSparse.apply
    return fwd(q, k, v, block_mask.tiles, block_mask.patterns, *lists, alibi, seed, *block_mask.block_size,
               scale, softcap, dropout_p, sinks)


def block_sparse_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_softmax_lse: bool = False,
    sinks: torch.Tensor | None = None,
):
    """Block-sparse attention in flash_attn layout: the pairs ``block_mask`` allows, nothing else.

    Tiles the mask marks empty are never loaded nor computed, so time and
    memory traffic grow with the number of non-empty tiles.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32; headdim 1 to 256.
        k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA).
        v: ``(batch, seqlen_k, nheads_k, headdim)``, like ``k``.
        block_mask: a ``BlockMask`` for ``(seqlen_q, seqlen_k)`` with batch
            1 or ``batch`` and heads 1 or ``nheads`` (query heads), on q's device.
        dropout_p: dropout on the attention weights (as ``flash_attn_func``).
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: also apply the causal mask aligned bottom-right (query ``i``
            sees keys ``j <= i + seqlen_k - seqlen_q``); the combined mask is
            cached on ``block_mask``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``, as flash_attn's.
        deterministic: accepted; the backward pass is always deterministic.
        return_softmax_lse: also return the LSE ``(batch, nheads, seqlen_q)`` fp32.
        sinks: attention sinks ``(nheads,)``, as ``flash_attn_func``'s.

    Returns:
        (torch.Tensor | tuple): ``out`` like q (rows that see no key are 0), or
            ``(out, lse)`` if ``return_softmax_lse``.
    """
    check_qkv(q, k, v, _LAYOUT)
    _check_mask(block_mask, q, k)
    check_dropout("dropout_p", dropout_p)
    check_softcap(softcap)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    check_sinks(sinks, q.shape[2], q)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    if causal:
        block_mask = block_mask.causal_part("bottom_right")
    out, lse = _run(q, k, v, block_mask, scale, float(softcap), alibi_slopes, float(dropout_p), sinks)
    return (out, lse) if return_softmax_lse else out


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention in SDPA layout ``(batch, nheads, seqlen, headdim)``.

    The same as ``block_sparse_attn_func`` with PyTorch SDPA's argument
    names; ``is_causal`` is aligned to the top-left corner as in PyTorch
    (query ``i`` sees keys ``j <= i``); ``sinks`` as ``flash_attn_func``'s.
    Returns ``(batch, nheads, seqlen_q, headdim)``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    check_qkv(q, k, v, "(batch, nheads, seqlen, headdim)")
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise FlashtileValueError(f"flashtile: query has {q.shape[2]} heads and key/value {k.shape[2]}; "
                         "pass enable_gqa=True for grouped-query attention")
    _check_mask(block_mask, q, k)
    check_dropout("dropout_p", dropout_p)
    check_sinks(sinks, q.shape[2], q)
    softmax_scale = check_scale("scale", scale, q.shape[-1])
    if is_causal:
        block_mask = block_mask.causal_part("top_left")
    out, _ = _run(q, k, v, block_mask, softmax_scale, 0.0, None, float(dropout_p), sinks)
    return out.transpose(1, 2)

