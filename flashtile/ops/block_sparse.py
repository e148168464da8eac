"""The block-sparse ops ``flashtile::block_sparse_fwd`` / ``flashtile::block_sparse_bwd``
and their autograd. They take the mask as its tensors (tile kinds, patterns and
the kernel's lists), so ``torch.compile(fullgraph=True)`` traces through them.

The dense kernels run with their SPARSE switch on: each program walks the
list of non-empty tiles of its query block (forward, dQ) or key block
(dK/dV) instead of a range, so empty tiles cost nothing and time grows with
the number of non-empty tiles. Full tiles run unmasked; partial tiles read
their element pattern.
"""

from __future__ import annotations

import torch

from ..backends.torch_tiled import attention_tiled_backward, attention_tiled_forward
from ..backends.triton.launch import attention as launch
from ..backends.triton.launch.device import interpreting
from ..masks.block_mask import BlockMask, KernelLists
from ..options import AttnOptions, empty_output


def _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, seqlen_q, seqlen_k, block_q,
             block_k):
    """A BlockMask around the op's tensors, its lists already built."""
    mask = BlockMask(tiles, patterns, seqlen_q, seqlen_k, (block_q, block_k))
    mask._lists = KernelLists(fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits)
    return mask


def _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask, sinks=None) -> AttnOptions:
    if alibi is not None:
        alibi = alibi.float()
        alibi = alibi.expand(q.shape[0], q.shape[2]) if alibi.dim() == 1 else alibi
    # ALiBi distances are aligned bottom-right, as flash_attn's
    return AttnOptions(softmax_scale, mask.seqlen_k - mask.seqlen_q, softcap=softcap, alibi=alibi,
                       dropout_p=dropout_p, seed=0 if seed is None else int(seed), block_mask=mask,
                       sinks=None if sinks is None else sinks.float())


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def _sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: torch.Tensor, patterns: torch.Tensor,
                fwd_full: torch.Tensor, fwd_part: torch.Tensor, bwd_full: torch.Tensor, bwd_part: torch.Tensor,
                pattern_bits: torch.Tensor, alibi: torch.Tensor | None, seed: torch.Tensor | None, block_q: int, block_k: int,
                softmax_scale: float, softcap: float, dropout_p: float,
                sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mask = _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, q.shape[1], k.shape[1],
                    block_q, block_k)
    opts = _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask, sinks)
    if q.numel() == 0 or k.shape[1] == 0:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
        if sinks is None:
            return empty_output(q, v.shape[-1]).zero_(), torch.full(lse_shape, float("-inf"), device=q.device,
                                                                    dtype=torch.float32)
        return empty_output(q, v.shape[-1]).zero_(), opts.sinks.reshape(1, -1, 1).expand(lse_shape).clone()
    if _use_triton(q):
        return launch.attention_forward(q, k, v, opts._replace(block_mask=None), sparse=mask)
    return attention_tiled_forward(q, k, v, opts)


block_sparse_fwd = torch.library.custom_op("flashtile::block_sparse_fwd", mutates_args=())(_sparse_fwd)


@block_sparse_fwd.register_fake
def _(q, k, v, tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, alibi, seed, block_q, block_k,
      softmax_scale, softcap, dropout_p, sinks=None):
    return empty_output(q, v.shape[-1]), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def _sparse_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, tiles: torch.Tensor, patterns: torch.Tensor, fwd_full: torch.Tensor,
                fwd_part: torch.Tensor, bwd_full: torch.Tensor, bwd_part: torch.Tensor, pattern_bits: torch.Tensor,
                alibi: torch.Tensor | None,
                seed: torch.Tensor | None, block_q: int, block_k: int, softmax_scale: float, softcap: float,
                dropout_p: float, sinks: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty without sinks."""
    no_sinks = q.new_empty(0)
    if q.numel() == 0 or k.numel() == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                no_sinks if sinks is None else torch.zeros_like(sinks))
    mask = _mask_of(tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, q.shape[1], k.shape[1],
                    block_q, block_k)
    opts = _options(q, alibi, seed, softmax_scale, softcap, dropout_p, mask, sinks)
    if _use_triton(q):
        dq, dk, dv, _, dsinks = launch.attention_backward(dout, q, k, v, out, lse, opts._replace(block_mask=None),
                                                          sparse=mask)
    else:
        dq, dk, dv, _, dsinks = attention_tiled_backward(dout, q, k, v, out, lse, opts)
    return dq, dk, dv, no_sinks if sinks is None else dsinks.to(sinks.dtype)


block_sparse_bwd = torch.library.custom_op("flashtile::block_sparse_bwd", mutates_args=())(_sparse_bwd)


@block_sparse_bwd.register_fake
def _(dout, q, k, v, out, lse, tiles, patterns, fwd_full, fwd_part, bwd_full, bwd_part, pattern_bits, alibi, seed,
      block_q, block_k, softmax_scale, softcap, dropout_p, sinks=None):
    dsinks = q.new_empty(0) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


_SINKS = 17  # position of sinks among the forward's inputs


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    sinks = inputs[_SINKS] if len(inputs) > _SINKS else None
    ctx.save_for_backward(q, k, v, *output, *inputs[3:12], sinks)
    ctx.scalars = tuple(inputs[12:_SINKS])
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, dlse, bwd=block_sparse_bwd):
    *saved, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, *saved, *ctx.scalars, sinks)
    grads = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
    if sinks is not None:
        grads[_SINKS] = dsinks
    return tuple(grads)


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


