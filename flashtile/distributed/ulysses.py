"""Ulysses context parallelism: an all-to-all turns sequence shards with every
head into the whole sequence with a group of heads per rank; each rank runs
flashtile's attention over the whole sequence for its heads; a second
all-to-all brings the output back to sequence shards. The backward pass runs
the same all-to-alls the other way round.

Each rank sends and receives ``(world_size - 1) / world_size`` of its q, k, v
and output once per direction, whatever the world size; the heads must split
evenly over the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import FlashtileValueError
from ..interface.checks import check_alibi, check_qkv, not_yet
from ..interface.flash_attn import flash_attn_func
from .layout import check_layout, chunks_per_rank, shard, unshard
from .ring import check_group

_LAYOUT = "(batch, seqlen_local, nheads, headdim)"


def _all_to_all(parts: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Part ``j`` of this rank goes to rank ``j``; returns the part each rank sent here, by rank."""
    sent = torch.stack(parts).contiguous()
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    return list(received.unbind(0))


def _seq_to_heads(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """``(batch, seqlen_local, nheads, d)`` shards -> ``(batch, seqlen, nheads / world, d)``:
    the whole sequence of this rank's group of heads."""
    world_size = dist.get_world_size(group)
    return unshard(_all_to_all(list(x.chunk(world_size, dim=2)), group), 1, layout)


def _heads_to_seq(x: torch.Tensor, group, layout: str) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    world_size = dist.get_world_size(group)
    return torch.cat(_all_to_all([shard(x, 1, r, world_size, layout) for r in range(world_size)], group), dim=2)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return _seq_to_heads(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.layout), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return _heads_to_seq(x, group, layout)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.layout), None, None


def ulysses_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    causal: bool = False,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    deterministic: bool = False,
):
    """Exact attention over a sequence sharded across the ranks of ``group``, by
    all-to-all between sequence shards and head groups (DeepSpeed-Ulysses);
    differentiable.

    Called by every rank at once with its shard, like
    :func:`ring_flash_attn_func`, and interchangeable with it: the output is
    this rank's shard of ``flash_attn_func`` over the whole sequence.

    Args:
        q: ``(batch, seqlen_local, nheads, headdim)``, fp16, bf16 or fp32;
            ``nheads`` a multiple of the world size.
        k: ``(batch, seqlen_local, nheads_k, headdim)``; ``nheads_k`` a multiple
            or a divisor of the world size (kv heads are repeated up to the
            world size when fewer), and ``nheads % nheads_k == 0``.
        v: ``(batch, seqlen_local, nheads_k, headdim)``, like ``k``.
        group: the process group (the default group if None).
        causal: causal mask over the whole sequence (bottom-right aligned, as
            ``flash_attn_func``; q and k have the same length here).
        layout: how the sequence was sharded, ``"zigzag"`` or ``"contiguous"``
            (see :func:`shard`).
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        window_size: ``(left, right)`` sliding window over the whole sequence.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``, all the heads
            (each rank uses those of its heads).
        dropout_p: must be 0 (``NotImplementedError`` otherwise).
        deterministic: accepted for compatibility.

    Returns:
        (torch.Tensor): ``out`` ``(batch, seqlen_local, nheads, headdim)`` in q's dtype.
    """
    check_qkv(q, k, v, _LAYOUT)
    group = check_group(group, "ulysses_flash_attn_func")
    layout = check_layout(layout)
    if dropout_p != 0:
        raise not_yet(f"dropout_p={dropout_p!r} in ulysses_flash_attn_func (only 0)")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    nheads, nheads_k = q.shape[2], k.shape[2]
    if nheads % world_size or (nheads_k % world_size and world_size % nheads_k):
        raise FlashtileValueError(
            f"flashtile: ulysses_flash_attn_func splits the heads over the {world_size} ranks: nheads ({nheads}) "
            f"must be a multiple of the world size and nheads_k ({nheads_k}) a multiple or a divisor of it; "
            "ring_flash_attn_func has no such condition")
    if k.shape[1] != q.shape[1]:
        raise FlashtileValueError(f"flashtile: ulysses_flash_attn_func shards q, k and v of the same positions; q has "
                                  f"seqlen_local {q.shape[1]}, k and v {k.shape[1]}")
    if q.shape[1] % chunks_per_rank(layout):
        raise FlashtileValueError(f"flashtile: with the zigzag layout each rank holds two equal chunks; q's "
                                  f"seqlen_local must be even, got {q.shape[1]}")
    if nheads_k < world_size:
        # one kv head per rank: kv head j serves query heads j * nheads / nheads_k onwards, so
        # repeating it keeps every query head with its kv head
        k, v = (t.repeat_interleave(world_size // nheads_k, dim=2) for t in (k, v))
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, q.shape[0], nheads, q.device)
        local_heads = slice(rank * nheads // world_size, (rank + 1) * nheads // world_size)
        alibi_slopes = alibi_slopes[..., local_heads].contiguous()
    q, k, v = (_SeqToHeads.apply(t, group, layout) for t in (q, k, v))
    out = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                          softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic)
    return _HeadsToSeq.apply(out, group, layout)
