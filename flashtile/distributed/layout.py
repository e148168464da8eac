"""How a sequence is cut into per-rank shards for context parallelism.

``"contiguous"``: the sequence is cut into ``world_size`` equal chunks; rank
``r`` holds chunk ``r``. ``"zigzag"``: the sequence is cut into ``2 *
world_size`` equal chunks; rank ``r`` holds chunks ``r`` and ``2 * world_size
- 1 - r``, one after the other. Under a causal mask the early chunks see few
keys and the late ones many, so the zigzag pairing gives every rank the same
amount of work; the contiguous cut leaves the last rank with ``2 *
world_size - 1`` times the work of the first.

Packed variable-length batches (``(total, ...)`` with offsets ``cu_seqlens``)
are cut document by document: every rank holds its share of every document,
cut by the same rule, and its shard is those shares one after the other.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch

from ..errors import FlashtileValueError

LAYOUTS = ("zigzag", "contiguous")


class Chunk(NamedTuple):
    """A run of consecutive positions in a rank's shard: rows ``local_start ..
    local_start + length`` of the shard are positions ``global_start ..
    global_start + length`` of the whole sequence."""
    local_start: int
    global_start: int
    length: int


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise FlashtileValueError(f"flashtile: layout must be 'zigzag' or 'contiguous', got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    """How many chunks of the cut sequence each rank holds."""
    return 2 if check_layout(layout) == "zigzag" else 1


def chunk_ids(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """The indices of the chunks rank ``rank`` holds, in the order of its shard."""
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard_chunks(layout: str, rank: int, world_size: int, local_len: int) -> list[Chunk]:
    """The chunks of rank ``rank``'s shard of ``local_len`` rows."""
    per_rank = chunks_per_rank(layout)
    length = local_len // per_rank
    return [Chunk(i * length, c * length, length) for i, c in enumerate(chunk_ids(layout, rank, world_size))]


def _check_split(name: str, seqlen: int, world_size: int, layout: str) -> int:
    parts = chunks_per_rank(layout) * world_size
    if seqlen % parts:
        raise FlashtileValueError(
            f"flashtile: the {layout} layout over {world_size} ranks cuts the sequence into {parts} equal chunks; "
            f"{name} ({seqlen}) must be a multiple of {parts}")
    return seqlen // parts


def _check_world(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise FlashtileValueError(f"flashtile: world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise FlashtileValueError(f"flashtile: rank must be an int in [0, {world_size}), got {rank!r}")


def shard(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s shard of the whole sequence ``x`` along ``dim``.

    Args:
        x: any tensor whose dimension ``dim`` is the sequence, e.g. ``(batch,
            seqlen, nheads, headdim)`` with ``dim=1``; its length must be a
            multiple of ``2 * world_size`` (zigzag) or ``world_size``
            (contiguous).
        dim: the sequence dimension.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: the number of ranks.
        layout: ``"zigzag"`` or ``"contiguous"`` (see the module docstring).

    Returns:
        (torch.Tensor): ``x`` with ``seqlen / world_size`` positions along
            ``dim`` (a new tensor), same dtype and device.
    """
    _check_world(rank, world_size)
    length = _check_split("the sequence length", x.shape[dim], world_size, check_layout(layout))
    parts = x.split(length, dim=dim)
    return torch.cat([parts[c] for c in chunk_ids(layout, rank, world_size)], dim=dim)


def unshard(shards, dim: int, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence from every rank's shard (the inverse of :func:`shard`).

    Args:
        shards: the shards of ranks ``0 .. world_size - 1``, in order, each as
            :func:`shard` returns it, all of one shape.
        dim: the sequence dimension.
        layout: the layout the shards were cut with.

    Returns:
        (torch.Tensor): the sequence, ``world_size`` times longer along ``dim``.
    """
    shards = list(shards)
    if not shards:
        raise FlashtileValueError("flashtile: unshard needs at least one shard")
    world_size = len(shards)
    length = _check_split("each shard's length", shards[0].shape[dim] * world_size, world_size, check_layout(layout))
    parts: list[torch.Tensor | None] = [None] * (chunks_per_rank(layout) * world_size)
    for rank, piece in enumerate(shards):
        if piece.shape != shards[0].shape:
            raise FlashtileValueError(f"flashtile: shard {rank} has shape {tuple(piece.shape)}, shard 0 "
                                      f"{tuple(shards[0].shape)}; all shards must have one shape")
        for c, part in zip(chunk_ids(layout, rank, world_size), piece.split(length, dim=dim)):
            parts[c] = part
    return torch.cat(parts, dim=dim)


def zigzag_shard(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """:func:`shard` with ``layout="zigzag"``: chunks ``rank`` and ``2 * world_size - 1 - rank``."""
    return shard(x, dim, rank, world_size, "zigzag")


def zigzag_unshard(shards, dim: int) -> torch.Tensor:
    """:func:`unshard` with ``layout="zigzag"``."""
    return unshard(shards, dim, "zigzag")


def contiguous_shard(x: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """:func:`shard` with ``layout="contiguous"``: chunk ``rank`` of ``world_size``."""
    return shard(x, dim, rank, world_size, "contiguous")


def contiguous_unshard(shards, dim: int) -> torch.Tensor:
    """:func:`unshard` with ``layout="contiguous"``."""
    return unshard(shards, dim, "contiguous")


def gather_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Every rank's shard gathered into the whole sequence, on every rank (an
    ``all_gather`` and :func:`unshard`; not differentiable).

    Args:
        x: this rank's shard; the sequence along ``dim``.
        dim: the sequence dimension.
        group: the process group (the default group if None).
        layout: the layout the shards were cut with.

    Returns:
        (torch.Tensor): the whole sequence.
    """
    import torch.distributed as dist

    x = x.contiguous()
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, x, group=group)
    return unshard(shards, dim, layout)


def document_lengths(cu_seqlens, world_size: int, layout: str) -> list[int]:
    """The documents' lengths from the global offsets ``cu_seqlens`` (int32 ``(ndocs + 1,)``,
    read on the host), each checked to cut into the layout's equal chunks."""
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    lengths = [b - a for a, b in pairwise(offsets)]
    if not offsets or offsets[0] != 0 or any(n < 0 for n in lengths):
        raise FlashtileValueError(f"flashtile: cu_seqlens must start at 0 and never decrease, got {offsets[:8]}"
                                  f"{'...' if len(offsets) > 8 else ''}")
    parts = chunks_per_rank(check_layout(layout)) * world_size
    for i, n in enumerate(lengths):
        if n % parts:
            raise FlashtileValueError(
                f"flashtile: the {layout} layout over {world_size} ranks cuts every document into {parts} equal "
                f"chunks; cu_seqlens gives document {i} the length {n}, not a multiple of {parts}")
    return lengths


def varlen_shard(x: torch.Tensor, cu_seqlens, rank: int, world_size: int, layout: str = "zigzag",
                 dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s shard of a packed batch of documents: its share of each document
    (:func:`shard` of the document), one document after the other.

    Args:
        x: the whole packed batch, e.g. ``(total, nheads, headdim)``, the documents along ``dim``.
        cu_seqlens: int32 ``(ndocs + 1,)`` (or a list): the documents' offsets in ``x``; each
            length a multiple of ``2 * world_size`` (zigzag) or ``world_size`` (contiguous).
        rank: this rank, ``0 <= rank < world_size``.
        world_size: the number of ranks.
        layout: ``"zigzag"`` or ``"contiguous"``.
        dim: the packed dimension.

    Returns:
        (torch.Tensor): ``total / world_size`` rows along ``dim`` (a new tensor); the
            documents' offsets in it are ``cu_seqlens / world_size``.
    """
    _check_world(rank, world_size)
    lengths = document_lengths(cu_seqlens, world_size, layout)
    if sum(lengths) != x.shape[dim]:
        raise FlashtileValueError(f"flashtile: cu_seqlens ends at {sum(lengths)}, x has {x.shape[dim]} rows along "
                                  f"dim {dim}")
    documents = x.split(lengths, dim=dim)
    # an empty document has an empty share (split into chunks, it has none)
    return torch.cat([shard(d, dim, rank, world_size, layout) if d.shape[dim] else d for d in documents], dim=dim)


def varlen_unshard(shards, cu_seqlens, layout: str = "zigzag", dim: int = 0) -> torch.Tensor:
    """The whole packed batch from every rank's shard (the inverse of :func:`varlen_shard`).

    Args:
        shards: the shards of ranks ``0 .. world_size - 1``, in order.
        cu_seqlens: the documents' global offsets, as given to :func:`varlen_shard`.
        layout: the layout the shards were cut with.
        dim: the packed dimension.

    Returns:
        (torch.Tensor): the packed batch, ``cu_seqlens[-1]`` rows along ``dim``.
    """
    shards = list(shards)
    if not shards:
        raise FlashtileValueError("flashtile: varlen_unshard needs at least one shard")
    world_size = len(shards)
    local_lengths = [n // world_size for n in document_lengths(cu_seqlens, world_size, layout)]
    for rank, piece in enumerate(shards):
        if piece.shape[dim] != sum(local_lengths):
            raise FlashtileValueError(f"flashtile: shard {rank} has {piece.shape[dim]} rows along dim {dim}; "
                                      f"cu_seqlens over {world_size} ranks gives each {sum(local_lengths)}")
    per_rank = [piece.split(local_lengths, dim=dim) for piece in shards]
    documents = [unshard([pieces[i] for pieces in per_rank], dim, layout) if n else per_rank[0][i]
                 for i, n in enumerate(local_lengths)]
    return torch.cat(documents, dim=dim)
