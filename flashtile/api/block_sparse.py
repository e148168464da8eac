"""Block-sparse attention: attention restricted by a :class:`BlockMask`.

The dense kernels run with their SPARSE switch on: each program walks the
list of non-empty tiles of its query block (forward, dQ) or key block
(dK/dV) instead of a range, so empty tiles cost nothing and time grows with
the number of non-empty tiles. Full tiles run unmasked; partial tiles read
their element pattern. The kernels tile at the mask's block size or a
divisor of it (they are tuned for 128 x 128 and 64 x 64 blocks; any powers
of two from 16 work).

The op ``flashtile::block_sparse_fwd`` / ``flashtile::block_sparse_bwd``
takes the mask as its tensors (tile kinds, patterns and the kernel's lists),
so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import torch

from ..reference import AttnOptions, attention_tiled_backward, attention_tiled_forward
from . import launch
from .block_mask import BlockMask, KernelLists
from .checks import check_alibi, check_dropout, check_qkv, check_scale, check_softcap, check_tensor
from .ops import dropout_seed

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, seqlen_q, seqlen_k, block_q,
             block_k):
    """A BlockMask around the op's tensors, its lists already built."""
    mask = BlockMask(tiles, patterns, seqlen_q, seqlen_k, (block_q, block_k))
    mask._lists = KernelLists(fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits)
    return mask


def _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask) -> AttnOptions:
    if alibi is not None:
        alibi = alibi.float()
        alibi = alibi.expand(q.shape[0], q.shape[2]) if alibi.dim() == 1 else alibi
    # ALiBi distances are aligned bottom-right, as flash_attn's
    return AttnOptions(softmax_scale, mask.seqlen_k - mask.seqlen_q, softcap=softcap, alibi=alibi,
                       dropout_p=dropout_p, seed=0 if seed is None else int(seed), block_mask=mask)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or launch.interpreting()


def _sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, patterns: torch.Tensor,
                fwd_full: torch.Tensor, fwd_part: torch.Tensor, bwd_full: torch.Tensor, bwd_part: torch.Tensor,
                pattern_bits: torch.Tensor, alibi: torch.Tensor | None, seed: torch.Tensor | None, block_q: int, block_k: int,
                softmax_scale: float, softcap: float, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, q.shape[1], k.shape[1],
                    block_q, block_k)
    opts = _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask)
    if q.numel() == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"),
                                               device=q.device, dtype=torch.float32)
    if _use_triton(q):
        return launch.attention_forward(q, k, v, opts._replace(block_mask=None), sparse=mask)
    return attention_tiled_forward(q, k, v, opts)


block_sparse_fwd = torch.library.custom_op("flashtile::block_sparse_fwd", mutates_args=())(_sparse_fwd)


@block_sparse_fwd.register_fake
def _(q, k, v, tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, alibi, seed, block_q, block_k,
      softmax_scale, softcap, dropout_p):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _sparse_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, tiles: torch.Tensor, patterns: torch.Tensor, fwd_full: torch.Tensor,
                fwd_part: torch.Tensor, bwd_full: torch.Tensor, bwd_part: torch.Tensor, pattern_bits: torch.Tensor,
                alibi: torch.Tensor | None,
                seed: torch.Tensor | None, block_q: int, block_k: int, softmax_scale: float, softcap: float,
                dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask = _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, q.shape[1], k.shape[1],
                    block_q, block_k)
    opts = _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask)
    if _use_triton(q):
        dq, dk, dv, _ = launch.attention_backward(dout, q, k, v, out, lse, opts._replace(block_mask=None),
                                                  sparse=mask)
    else:
        dq, dk, dv, _ = attention_tiled_backward(dout, q, k, v, out, lse, opts)
    return dq, dk, dv


block_sparse_bwd = torch.library.custom_op("flashtile::block_sparse_bwd", mutates_args=())(_sparse_bwd)


@block_sparse_bwd.register_fake
def _(dout, q, k, v, out, lse, tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, alibi, seed,
      block_q, block_k, softmax_scale, softcap, dropout_p):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, *output, *inputs[3:12])
    ctx.scalars = tuple(inputs[12:])
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, dlse, bwd=block_sparse_bwd):
    dq, dk, dv = bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, *ctx.saved_tensors, *ctx.scalars)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBlockSparse(torch.autograd.Function):
    """The registered ops' forward and backward without the op dispatch (used outside torch.compile)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _sparse_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, bwd=_sparse_bwd)


def _check_mask(block_mask, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"flashtile: block_mask must be a flashtile BlockMask, got {type(block_mask).__name__}")
    if (block_mask.seqlen_q, block_mask.seqlen_k) != (q.shape[1], k.shape[1]):
        raise ValueError(f"flashtile: block_mask is for seqlen_q={block_mask.seqlen_q}, "
                         f"seqlen_k={block_mask.seqlen_k}, the inputs have {q.shape[1]} and {k.shape[1]}")
    b, h = block_mask.shape[:2]
    if b not in (1, q.shape[0]) or h not in (1, q.shape[2]):
        raise ValueError(f"flashtile: block_mask has (batch, heads) = ({b}, {h}); expected 1 or {q.shape[0]} "
                         f"and 1 or {q.shape[2]} (the query heads)")
    if block_mask.device != q.device:
        raise ValueError(f"flashtile: block_mask is on {block_mask.device}, the inputs on {q.device}; "
                         "use block_mask.to(device)")


def _run(q, k, v, block_mask: BlockMask, scale: float, softcap: float, alibi, dropout_p: float):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    seed = dropout_seed(dropout_p)
    lists = block_mask.kernel_lists()
    fwd = block_sparse_fwd if torch.compiler.is_compiling() else _EagerBlockSparse.apply
    return fwd(q, k, v, block_mask.tiles, block_mask.patterns, *lists, alibi, seed, *block_mask.block_size,
               scale, softcap, dropout_p)


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
):
    """Block-sparse attention in flash_attn layout: the pairs ``block_mask`` allows, nothing else.

    Tiles the mask marks empty are never loaded nor computed, so time and
    memory traffic grow with the number of non-empty tiles.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32; headdim 1 to 256.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0`` (GQA/MQA).
        block_mask: a :class:`BlockMask` for ``(seqlen_q, seqlen_k)`` with batch
            1 or ``batch`` and heads 1 or ``nheads`` (query heads), on q's device.
        dropout_p: dropout on the attention weights (as :func:`flash_attn_func`).
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: also apply the causal mask aligned bottom-right (query ``i``
            sees keys ``j <= i + seqlen_k - seqlen_q``); the combined mask is
            cached on ``block_mask``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``, as flash_attn's.
        deterministic: accepted; the backward pass is always deterministic.
        return_softmax_lse: also return the LSE ``(batch, nheads, seqlen_q)`` fp32.

    Returns:
        ``out`` like q (rows that see no key are 0), or ``(out, lse)``.
    """
    check_qkv(q, k, v, _LAYOUT)
    _check_mask(block_mask, q, k)
    check_dropout("dropout_p", dropout_p)
    check_softcap(softcap)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    if causal:
        block_mask = block_mask.causal_part("bottom_right")
    out, lse = _run(q, k, v, block_mask, scale, float(softcap), alibi_slopes, float(dropout_p))
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
) -> torch.Tensor:
    """Block-sparse attention in SDPA layout ``(batch, nheads, seqlen, headdim)``.

    The same as :func:`block_sparse_attn_func` with PyTorch SDPA's argument
    names; ``is_causal`` is aligned to the top-left corner as in PyTorch
    (query ``i`` sees keys ``j <= i``). Returns ``(batch, nheads, seqlen_q, headdim)``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    check_qkv(q, k, v, "(batch, nheads, seqlen, headdim)")
    if q.shape[2] != k.shape[2] and not enable_gqa:
        raise ValueError(f"flashtile: query has {q.shape[2]} heads and key/value {k.shape[2]}; "
                         "pass enable_gqa=True for grouped-query attention")
    _check_mask(block_mask, q, k)
    check_dropout("dropout_p", dropout_p)
    softmax_scale = check_scale("scale", scale, q.shape[-1])
    if is_causal:
        block_mask = block_mask.causal_part("top_left")
    out, _ = _run(q, k, v, block_mask, softmax_scale, 0.0, None, float(dropout_p))
    return out.transpose(1, 2)

