"""Ring attention: context parallelism by passing keys and values around a ring.

Each rank holds a shard of the sequence (q, k and v of the same positions,
cut as ``layout.py`` says). In ``world_size`` steps every rank's keys and
values visit every rank; at each step a rank attends its queries to the block
it holds with flashtile's attention op (the Triton kernels on a GPU, the CPU
paths on a CPU) while the next block is already in transit, and merges the
block's partial output into its running result by the log-sum-exp, in fp32.

Masks are placed by global position: query position ``a`` sees key position
``b`` when ``a - left <= b <= a + right`` (``left``/``right`` of the window,
-1 unbounded; causal is ``right = 0``). Per step, every pair of a query chunk
and a key chunk is either empty (skipped), full (no mask) or partial (the
op's diagonal offset and window, from the chunks' global starts); neighbouring
pieces are called as one block where that is exact.

The backward pass runs the same ring: each block's gradients are recomputed
from the global output and LSE (so ``delta = rowsum(dout * out)`` is the
global one), dQ stays on its rank, and the dK/dV accumulators (fp32) travel
with the keys and values until they are back at their owner.

Packed documents (``ring_flash_attn_varlen_func``) are planned the same way
document by document, with positions within each document. A step's blocks of
all documents become one varlen call of the op (its per-document offsets
built on the host once per call), the rows between them documents without
keys or without queries; the op aligns each document bottom-right, so a
window piece whose offset that alignment cannot express runs as a call of
its own.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import FlashtileTypeError, FlashtileValueError
from ..interface.checks import (
    as_max_seqlen,
    check_alibi,
    check_qkv,
    check_scale,
    check_softcap,
    check_tensor,
    check_varlen_qkv,
    not_yet,
)
from ..interface.flash_attn import _window
from ..ops.attention import attn_bwd, attn_fwd
from .comm import Ring
from .layout import Chunk, check_layout, chunks_per_rank, document_lengths, shard_chunks

_LAYOUT = "(batch, seqlen_local, nheads, headdim)"
_UNBOUNDED = (-1, -1)


class Packed(NamedTuple):
    """The documents of a packed block: int32 offsets into the local query rows and
    into the rows of the key/value block held (on the inputs' device), and the
    longest of each."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    alibi: torch.Tensor | None = None  # per-document ALiBi slopes, one row per document of the call


class Block(NamedTuple):
    """One attention call of a ring step: local query rows against local rows of
    the key/value block held, with the op's diagonal offset and window; or, with
    ``packed``, every row as the documents of a varlen call (each aligned
    bottom-right, so diag is implied by its lengths). ``document``: in a packed
    batch, the document whose rows the block holds."""
    q_rows: slice
    k_rows: slice
    diag: int
    window: tuple[int, int]
    packed: Packed | None = None
    document: int = 0


def _rows(chunks: list[Chunk]) -> slice:
    return slice(chunks[0].local_start, chunks[-1].local_start + chunks[-1].length)


def _visibility(qc: Chunk, kc: Chunk, left: int, right: int) -> str:
    """'empty', 'full' or 'partial': how much of key chunk ``kc`` the queries of ``qc`` see."""
    q_first, q_last = qc.global_start, qc.global_start + qc.length - 1
    k_first, k_last = kc.global_start, kc.global_start + kc.length - 1
    if (right >= 0 and q_last + right < k_first) or (left >= 0 and q_first - left > k_last):
        return "empty"
    if (right < 0 or q_first + right >= k_last) and (left < 0 or q_last - left <= k_first):
        return "full"
    return "partial"


def _positional_blocks(q_chunks: list[Chunk], k_chunks: list[Chunk], window: tuple[int, int]) -> list[Block]:
    """``plan_blocks`` where the scores depend on the distance of positions (ALiBi): one call
    per pair of chunks that sees anything, its diagonal offset the chunks' global offset."""
    left, right = window
    return [Block(slice(qc.local_start, qc.local_start + qc.length), slice(kc.local_start, kc.local_start + kc.length),
                  qc.global_start - kc.global_start,
                  _UNBOUNDED if _visibility(qc, kc, left, right) == "full" else window)
            for qc in q_chunks for kc in k_chunks if _visibility(qc, kc, left, right) != "empty"]


def plan_blocks(q_chunks: list[Chunk], k_chunks: list[Chunk], window: tuple[int, int],
                positional: bool = False) -> list[Block]:
    """The attention calls of one ring step: the queries of ``q_chunks`` against the
    keys of ``k_chunks``, under ``window = (left, right)`` in global positions.
    ``positional``: every call's diagonal offset is exact (ALiBi), not only where a mask needs it."""
    left, right = window
    if positional:
        return _positional_blocks(q_chunks, k_chunks, window)
    if left < 0 and right < 0:  # no mask: one call
        return [Block(_rows(q_chunks), _rows(k_chunks), 0, _UNBOUNDED)]
    if q_chunks == k_chunks and left < 0 and right == 0:
        # a rank's own block, causal: a shard keeps the order of the positions, and a causal
        # mask depends only on that order, so the shard's local causal mask is exact
        return [Block(_rows(q_chunks), _rows(k_chunks), 0, (-1, 0))]
    rows = []  # per query chunk: its rows and its pieces (key rows, diag, window)
    for qc in q_chunks:
        pieces: list[tuple[slice, int, tuple[int, int]]] = []
        for kc in k_chunks:
            seen = _visibility(qc, kc, left, right)
            if seen == "empty":
                continue
            k_rows = slice(kc.local_start, kc.local_start + kc.length)
            if seen == "full" and pieces and pieces[-1][2] == _UNBOUNDED and pieces[-1][0].stop == k_rows.start:
                pieces[-1] = (slice(pieces[-1][0].start, k_rows.stop), 0, _UNBOUNDED)  # neighbours, both full
            elif seen == "full":
                pieces.append((k_rows, 0, _UNBOUNDED))
            else:
                pieces.append((k_rows, qc.global_start - kc.global_start, (left, right)))
        rows.append((slice(qc.local_start, qc.local_start + qc.length), pieces))
    merged: list[tuple[slice, list]] = []
    for q_rows, pieces in rows:
        # neighbouring query chunks that see the same keys in full: one call
        if (merged and merged[-1][0].stop == q_rows.start and merged[-1][1] == pieces
                and all(w == _UNBOUNDED for _, _, w in pieces)):
            merged[-1] = (slice(merged[-1][0].start, q_rows.stop), pieces)
        else:
            merged.append((q_rows, pieces))
    return [Block(q_rows, k_rows, diag, w) for q_rows, pieces in merged for k_rows, diag, w in pieces if pieces]


class _Ready:
    """A finished exchange (a ring of one rank sends nothing)."""

    def __init__(self, tensors):
        self._tensors = tensors

    def wait(self):
        return self._tensors


def _merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a block's (out, lse) into the running fp32 (out, lse) views, in place:
    ``out = (exp(lse) out + exp(block_lse) block_out) / exp(new_lse)``."""
    new_lse = torch.logaddexp(lse, block_lse)
    finite = torch.where(torch.isinf(new_lse), 0.0, new_lse)  # -inf only where neither saw a key
    keep = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(block_lse - finite).transpose(1, 2).unsqueeze(-1)
    out.mul_(keep).add_(block_out.float() * take)
    lse.copy_(new_lse)


class _Settings(NamedTuple):
    ring: Ring
    scale: float
    softcap: float
    steps: list[list[Block]]  # the blocks of each ring step
    alibi: torch.Tensor | None = None  # fp32 ALiBi slopes, (nheads,) or (batch, nheads) ((ndocs, nheads) if varlen)
    varlen: bool = False  # a packed batch of documents, run as a batch of one


def plan_steps(ring: Ring, layout: str, local_len: int, window: tuple[int, int],
               positional: bool = False) -> list[list[Block]]:
    """The blocks of each step for this rank: at step ``t`` it holds the keys of rank ``rank - t``
    (``positional``: see ``plan_blocks``)."""
    q_chunks = shard_chunks(layout, ring.rank, ring.world_size, local_len)
    return [plan_blocks(q_chunks, shard_chunks(layout, (ring.rank - step) % ring.world_size, ring.world_size,
                                               local_len), window, positional)
            for step in range(ring.world_size)]


def _document_chunks(layout: str, rank: int, world_size: int, lengths: list[int]) -> list[list[Chunk]]:
    """Per document, the chunks of ``rank``'s shard of a packed batch: local rows in the shard,
    global starts as positions within the document (masks never cross documents)."""
    documents, local_start = [], 0
    for length in lengths:
        chunks = shard_chunks(layout, rank, world_size, length // world_size)
        documents.append([Chunk(local_start + c.local_start, c.global_start, c.length) for c in chunks])
        local_start += length // world_size
    return documents


def _bottom_right(b: Block, positional: bool) -> bool:
    """Whether a varlen call (each document aligned bottom-right) computes the block exactly
    (``positional``: the scores depend on the distance of positions, so even without a mask)."""
    return (b.window == _UNBOUNDED and not positional
            or b.diag == (b.k_rows.stop - b.k_rows.start) - (b.q_rows.stop - b.q_rows.start))


def _pack(blocks: list[Block], local_len: int, device, slopes: torch.Tensor | None = None) -> Block:
    """Blocks of disjoint, increasing query rows and key rows, all of one window, as one
    varlen call over every row: the rows between them become documents without keys
    (their output is zero and their LSE -inf, which the merge leaves out) or without
    queries (their gradients are zero). ``slopes``: per-document ALiBi slopes
    ``(ndocs, nheads)``, gathered into one row per document of the call."""
    cu_q, cu_k, documents = [0], [0], []

    def add(q_stop: int, k_stop: int, document: int = 0) -> None:
        if q_stop > cu_q[-1] or k_stop > cu_k[-1]:
            cu_q.append(q_stop)
            cu_k.append(k_stop)
            documents.append(document)

    for b in blocks:
        add(b.q_rows.start, cu_k[-1])  # queries that see no key of this call
        add(cu_q[-1], b.k_rows.start)  # keys that no query of this call sees
        add(b.q_rows.stop, b.k_rows.stop, b.document)
    add(local_len, cu_k[-1])
    add(cu_q[-1], local_len)
    longest_q = max(b - a for a, b in pairwise(cu_q))
    longest_k = max(b - a for a, b in pairwise(cu_k))
    cu_q_t, cu_k_t = (torch.tensor(offsets, dtype=torch.int32, device=device) for offsets in (cu_q, cu_k))
    alibi = None if slopes is None else slopes[torch.tensor(documents, device=slopes.device)]
    return Block(slice(None), slice(None), 0, blocks[0].window, Packed(cu_q_t, cu_k_t, longest_q, longest_k, alibi))


def plan_varlen_steps(ring: Ring, layout: str, lengths: list[int], window: tuple[int, int], device,
                      slopes: torch.Tensor | None = None) -> list[list[Block]]:
    """The blocks of each step for this rank's shard of a packed batch of documents of
    ``lengths`` (global): each document's blocks as :func:`plan_blocks` plans them, gathered
    into as few varlen calls as the documents allow; a block with a window that the
    bottom-right alignment of a varlen call cannot place stays a call of its own.
    ``slopes``: ALiBi slopes, ``(nheads,)`` or per document ``(ndocs, nheads)``; every
    call's diagonal offset is then exact (only the blocks whose chunks are aligned
    bottom-right share a call)."""
    positional = slopes is not None
    per_document = positional and slopes.dim() == 2
    local_len = sum(lengths) // ring.world_size
    q_documents = _document_chunks(layout, ring.rank, ring.world_size, lengths)
    steps = []
    for step in range(ring.world_size):
        k_documents = _document_chunks(layout, (ring.rank - step) % ring.world_size, ring.world_size, lengths)
        calls: list[list[Block]] = []  # each: blocks for one varlen call
        single: list[Block] = []
        for document, (q_chunks, k_chunks) in enumerate(zip(q_documents, k_documents)):
            if not q_chunks[0].length:
                continue  # an empty document
            for b in plan_blocks(q_chunks, k_chunks, window, positional):
                b = b._replace(document=document)
                if not _bottom_right(b, positional):
                    single.append(b)
                    continue
                call = next((c for c in calls if c[-1].window == b.window and c[-1].q_rows.stop <= b.q_rows.start
                             and c[-1].k_rows.stop <= b.k_rows.start), None)
                if call is None:
                    calls.append([b])
                else:
                    call.append(b)
        steps.append([_pack(c, local_len, device, slopes if per_document else None) for c in calls] + single)
    return steps


def _exchange(s: _Settings, tensors: list[torch.Tensor]):
    return s.ring.exchange(tensors) if s.ring.world_size > 1 else _Ready(tensors)


def _slopes(b: Block, s: _Settings) -> torch.Tensor | None:
    """The ALiBi slopes of a block's call: a packed call's own rows; a packed batch's
    per-document slopes, the row of the block's document (the batch is a batch of one)."""
    if b.packed is not None:
        return s.alibi if b.packed.alibi is None else b.packed.alibi
    if s.alibi is not None and s.varlen and s.alibi.dim() == 2:
        return s.alibi[b.document]
    return s.alibi


def _block_forward(q, k, v, b: Block, s: _Settings):
    """(out, lse) of one block; batched tensors (a packed batch as a batch of one)."""
    if b.packed is None:
        return attn_fwd(q[:, b.q_rows], k[:, b.k_rows], v[:, b.k_rows], None, None, None, _slopes(b, s), None, 0, 0,
                        s.scale, b.diag, *b.window, s.softcap, 0.0)
    p = b.packed
    out, lse = attn_fwd(q[0], k[0], v[0], p.cu_q, p.cu_k, None, _slopes(b, s), None, p.max_q, p.max_k, s.scale, 0,
                        *b.window, s.softcap, 0.0)
    return out[None], lse[None]


def _block_backward(dout, q, k, v, out, lse, b: Block, s: _Settings):
    """(dq, dk, dv) of one block, as :func:`_block_forward`."""
    if b.packed is None:
        return attn_bwd(dout[:, b.q_rows], q[:, b.q_rows], k[:, b.k_rows], v[:, b.k_rows], out[:, b.q_rows],
                        lse[:, :, b.q_rows].contiguous(), None, None, None, _slopes(b, s), None, 0, 0, s.scale,
                        b.diag, *b.window, s.softcap, 0.0, False)[:3]
    p = b.packed
    grads = attn_bwd(dout[0], q[0], k[0], v[0], out[0], lse[0], p.cu_q, p.cu_k, None, _slopes(b, s), None, p.max_q,
                     p.max_k, s.scale, 0, *b.window, s.softcap, 0.0, False)
    return tuple(g[None] for g in grads[:3])


def ring_forward(q, k, v, s: _Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q's dtype, lse fp32 ``(batch, nheads, seqlen_local)``) of this rank's queries."""
    batch, local_len, nheads, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, nheads, local_len), float("-inf"), dtype=torch.float32, device=q.device)
    kv = [k, v]
    for step, blocks in enumerate(s.steps):
        # the next block travels while this one is computed
        incoming = _exchange(s, kv) if step + 1 < s.ring.world_size else None
        for b in blocks:
            block_out, block_lse = _block_forward(q, *kv, b, s)
            _merge_into(out[:, b.q_rows], lse[:, :, b.q_rows], block_out, block_lse)
        if incoming is not None:
            kv = incoming.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, s: _Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of this rank's shard, in the inputs' dtypes."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, dkv_incoming = [k, v], None
    for step, blocks in enumerate(s.steps):
        kv_incoming = _exchange(s, kv) if step + 1 < s.ring.world_size else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for b in blocks:
            block_dq, block_dk, block_dv = _block_backward(dout, q, *kv, out, lse, b, s)
            dq[:, b.q_rows] += block_dq
            dk[:, b.k_rows] += block_dk
            dv[:, b.k_rows] += block_dv
        if dkv_incoming is not None:
            # the gradients of this block from the ranks it visited before
            dk_before, dv_before = dkv_incoming.wait()
            dk += dk_before
            dv += dv_before
        # on to the next rank; after the last step that is the block's owner
        dkv_incoming = _exchange(s, [dk, dv])
        if kv_incoming is not None:
            kv = kv_incoming.wait()
    dk, dv = dkv_incoming.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, settings):
        out, lse = ring_forward(q, k, v, settings)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = settings
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.settings)
        return dq, dk, dv, None


def check_group(group, name: str):
    """The process group, checked to be usable."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"flashtile: {name} needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise FlashtileValueError(f"flashtile: group must be a torch.distributed ProcessGroup or None, "
                                  f"got {type(group).__name__}")
    return group


def ring_flash_attn_func(
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
    return_attn_probs: bool = False,
):
    """Exact attention over a sequence sharded across the ranks of ``group``
    (context parallelism by ring attention); differentiable.

    Every rank of ``group`` calls it at once with its own shard of q, k and v
    (cut with :func:`flashtile.distributed.shard`, or by the same rule) and
    gets its shard of the output, equal to ``flash_attn_func`` over the whole
    sequence, shard for shard. Keys and values go around the ring once (twice,
    with their gradients, in the backward pass); each transfer overlaps the
    attention of the block before.

    Args:
        q: ``(batch, seqlen_local, nheads, headdim)``, fp16, bf16 or fp32: this
            rank's queries; ``seqlen_local`` is the same on every rank and even
            for the zigzag layout.
        k: ``(batch, seqlen_local, nheads_k, headdim)``: the keys of the same
            positions; ``nheads % nheads_k == 0`` (GQA/MQA).
        v: ``(batch, seqlen_local, nheads_k, headdim)``, like ``k``.
        group: the ``torch.distributed`` process group over which the sequence
            is sharded (the default group if None); gloo for CPU tensors, NCCL
            for CUDA tensors.
        causal: causal mask over the whole sequence.
        layout: how the sequence was sharded: ``"zigzag"`` (rank ``r`` holds
            chunks ``r`` and ``2 * world_size - 1 - r`` of ``2 * world_size``;
            balanced under a causal mask) or ``"contiguous"`` (chunk ``r`` of
            ``world_size``).
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        window_size: ``(left, right)`` sliding window in positions of the whole
            sequence, -1 for unbounded; key blocks outside every query's window
            are not computed (they still travel).
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``; adds ``-slope *
            |i - j|`` for positions ``i``, ``j`` of the whole sequence, as
            ``flash_attn_func`` on it (every pair of chunks then runs as a call
            of its own, its diagonal offset the chunks' distance).
        dropout_p: must be 0 (``NotImplementedError`` otherwise).
        deterministic: accepted for compatibility; the result is always
            deterministic.
        return_attn_probs: also return this rank's LSE and ``None`` (as
            ``flash_attn_func`` does without dropout).

    Returns:
        (torch.Tensor | tuple): ``out`` ``(batch, seqlen_local, nheads, headdim)``
            in q's dtype, or ``(out, softmax_lse, None)`` with ``softmax_lse``
            fp32 ``(batch, nheads, seqlen_local)`` (natural log, over the whole
            sequence's keys) if ``return_attn_probs``.
    """
    check_qkv(q, k, v, _LAYOUT)
    group = check_group(group, "ring_flash_attn_func")
    layout = check_layout(layout)
    check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
    if dropout_p != 0:
        raise not_yet(f"dropout_p={dropout_p!r} in ring_flash_attn_func (only 0)")
    if k.shape[1] != q.shape[1]:
        raise FlashtileValueError(f"flashtile: ring_flash_attn_func shards q, k and v of the same positions; q has "
                                  f"seqlen_local {q.shape[1]}, k and v {k.shape[1]}")
    if q.shape[1] % chunks_per_rank(layout):
        raise FlashtileValueError(f"flashtile: with the zigzag layout each rank holds two equal chunks; q's "
                                  f"seqlen_local must be even, got {q.shape[1]}")
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    ring = Ring(group)
    alibi = None if alibi_slopes is None else alibi_slopes.float()
    settings = _Settings(ring, scale, float(softcap),
                         plan_steps(ring, layout, q.shape[1], window, positional=alibi is not None), alibi)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = _RingAttention.apply(q, k, v, settings)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group=None,
    causal: bool = False,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_attn_probs: bool = False,
):
    """Exact attention over a packed batch of documents sharded across the ranks of
    ``group`` (ring attention over variable-length sequences); differentiable.

    Every rank holds its share of every document (cut with
    :func:`flashtile.distributed.varlen_shard`): with the zigzag layout, chunks
    ``r`` and ``2 * world_size - 1 - r`` of the ``2 * world_size`` equal chunks of
    each document, so causal work is balanced document by document. The result
    is ``flash_attn_varlen_func`` over the whole batch, shard for shard: masks
    are placed by position within each document, and no query sees another
    document's keys. Each ring step runs its documents as one varlen call where
    their masks allow (always without a window).

    Args:
        q: ``(total_local, nheads, headdim)``, fp16, bf16 or fp32: this rank's
            queries, its share of each document one after the other.
        k: ``(total_local, nheads_k, headdim)``: the keys of the same positions;
            ``nheads % nheads_k == 0`` (GQA/MQA).
        v: ``(total_local, nheads_k, headdim)``, like ``k``.
        cu_seqlens: int32 ``(ndocs + 1,)``: the documents' offsets in the WHOLE
            packed batch, the same on every rank (``total_local = cu_seqlens[-1] /
            world_size``); every document's length a multiple of ``2 * world_size``
            (zigzag) or ``world_size`` (contiguous). Read on the host once per call.
        max_seqlen: the longest document (whole), at least ``max(lengths)``.
        group: the process group (the default group if None).
        causal: causal mask within each document.
        layout: ``"zigzag"`` or ``"contiguous"``, as the batch was sharded.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        window_size: ``(left, right)`` sliding window in positions within each
            document, -1 for unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or per document ``(ndocs, nheads)``; adds
            ``-slope * |i - j|`` for positions ``i``, ``j`` within a document. A
            ring step then makes one call per pair of chunks whose offsets differ.
        return_attn_probs: also return this rank's LSE and ``None``.

    Returns:
        (torch.Tensor | tuple): ``out`` ``(total_local, nheads, headdim)`` in q's
            dtype, or ``(out, softmax_lse, None)`` with ``softmax_lse`` fp32
            ``(nheads, total_local)`` (over each whole document's keys) if
            ``return_attn_probs``.
    """
    check_varlen_qkv(q, k, v)
    group = check_group(group, "ring_flash_attn_varlen_func")
    layout = check_layout(layout)
    ring = Ring(group)
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise FlashtileTypeError(f"flashtile: cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} of shape "
                                 f"{tuple(cu_seqlens.shape)}")
    lengths = document_lengths(cu_seqlens, ring.world_size, layout)
    max_seqlen = as_max_seqlen(max_seqlen)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths, default=0):
        raise FlashtileValueError(f"flashtile: max_seqlen must be an int at least the longest document "
                                  f"({max(lengths, default=0)}), got {max_seqlen!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[0] * ring.world_size != sum(lengths):
            raise FlashtileValueError(f"flashtile: {name} has {t.shape[0]} rows; cu_seqlens ends at {sum(lengths)}, "
                                      f"so each of the {ring.world_size} ranks holds {sum(lengths) / ring.world_size}")
    window = _window(window_size, bool(causal))
    check_softcap(softcap)
    scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    check_alibi(alibi_slopes, len(lengths), q.shape[1], q.device)
    alibi = None if alibi_slopes is None else alibi_slopes.float()
    settings = _Settings(ring, scale, float(softcap), plan_varlen_steps(ring, layout, lengths, window, q.device, alibi),
                         alibi, varlen=True)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # a packed batch runs as a batch of one
    out, lse = _RingAttention.apply(q[None], k[None], v[None], settings)
    out, lse = out[0], lse[0]
    return (out, lse, None) if return_attn_probs else out
