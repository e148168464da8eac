"""Block masks for block-sparse attention.

A ``BlockMask`` cuts the ``(seqlen_q, seqlen_k)`` score matrix into tiles
of ``block_size = (block_q, block_k)`` and records, per (batch, query head)
(either may be broadcast: size 1), the kind of every tile:

* ``EMPTY``: no (query, key) pair of the tile is allowed. The kernels never
  load its keys nor compute its scores: cost follows the non-empty tiles.
* ``FULL``: every pair is allowed (rows past ``seqlen_q`` do not count). The
  kernels run such tiles without any element mask.
* a *partial* tile: the pairs allowed are given by an element pattern
  ``(block_q, block_k)``. Patterns are deduplicated (all diagonal tiles of a
  causal mask share one), and the kernels read a tile's pattern only for
  partial tiles. Keys past ``seqlen_k`` are never allowed, so a tile that
  straddles the end of the keys is partial.

Storage: ``tiles`` int32 ``(B, H, n_q_blocks, n_k_blocks)`` (``EMPTY = -2``,
``FULL = -1``, else the index of the tile's pattern in ``patterns``, bool
``(n_patterns, block_q, block_k)``). The kernels take lists derived from it
(``BlockMask.kernel_lists``): per query block, the key blocks of its full
tiles and of its partial tiles with their pattern ids; per key block the
same over query blocks (the transpose, for the dK/dV kernel).

Build one from a boolean block layout (``BlockMask.from_layout``), from
a vectorised predicate ``mask_mod(b, h, q_idx, kv_idx)`` evaluated per tile
(``create_block_mask``, as FlexAttention's), or from the ready-made
patterns in ``flashtile.masks.patterns``; combine masks with ``&``
and ``|``; ``BlockMask.causal`` is the causal mask itself.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..errors import FlashtileTypeError, FlashtileValueError

EMPTY = -2
FULL = -1

# the predicate is evaluated on chunks of query blocks of at most this many elements
_CHUNK_ELEMENTS = 1 << 26


def _pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in block_size)
            or not all(b >= 16 and b & (b - 1) == 0 for b in block_size)):
        raise FlashtileValueError(f"flashtile: block_size must be a power of two >= 16, or a pair (block_q, block_k) of them, "
                         f"got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_seqlen(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FlashtileValueError(f"flashtile: {name} must be an int >= 0, got {n!r}")
    return n


class KernelLists(NamedTuple):
    """Tile lists the kernels iterate over, int32, contiguous.

    ``fwd_full`` ``(B, H, n_q_blocks, 1 + W)``: per query block the number of
    full tiles, then their key-block indices. ``fwd_part`` ``(B, H,
    n_q_blocks, 1 + 2 W')``: the number of partial tiles, then (key block,
    pattern id) pairs. ``bwd_full`` / ``bwd_part``: the same per key block
    over query blocks. ``pattern_bits``: the patterns bit-packed, int32
    ``(n_patterns, block_q, ceil(block_k / 32))``, bit ``b`` of word ``w`` of a
    row being key ``32 w + b`` of the tile.
    """
    fwd_full: torch.Tensor
    fwd_part: torch.Tensor
    bwd_full: torch.Tensor
    bwd_part: torch.Tensor
    pattern_bits: torch.Tensor


def pack_bits(patterns: torch.Tensor) -> torch.Tensor:
    """bool ``(n, rows, cols)`` -> int32 ``(n, rows, ceil(cols / 32))``, bit ``b`` of word ``w`` = column ``32 w + b``."""
    n, rows, cols = patterns.shape
    words = -(-cols // 32)
    padded = torch.zeros(n, rows, words * 32, dtype=torch.int64, device=patterns.device)
    padded[..., :cols] = patterns.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=patterns.device) << torch.arange(32, device=patterns.device)
    packed = (padded.reshape(n, rows, words, 32) * weights).sum(-1)
    # the same 32 bits as int32 (two's complement)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def _lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full and partial tile lists along the last dim of ``tiles`` (see ``KernelLists``)."""
    lead = tiles.shape[:-1]
    full = tiles == FULL
    part = tiles >= 0
    n_full = full.sum(-1, dtype=torch.int32)
    n_part = part.sum(-1, dtype=torch.int32)
    width_full = max(1, int(n_full.max())) if n_full.numel() else 1
    width_part = max(1, int(n_part.max())) if n_part.numel() else 1
    # stable sort puts the selected tiles first, in increasing block order
    order_full = torch.argsort((~full).to(torch.int8), dim=-1, stable=True)[..., :width_full]
    order_part = torch.argsort((~part).to(torch.int8), dim=-1, stable=True)[..., :width_part]
    pattern_ids = tiles.gather(-1, order_part)
    fwd_full = torch.cat([n_full[..., None], order_full.to(torch.int32)], -1)
    pairs = torch.stack([order_part.to(torch.int32), pattern_ids.to(torch.int32)], -1).reshape(*lead, 2 * width_part)
    fwd_part = torch.cat([n_part[..., None], pairs], -1)
    return fwd_full.contiguous(), fwd_part.contiguous()


class BlockMask:
    """Which (query-block, key-block) tiles of the score matrix are empty, full or
    partial (with an element pattern); see the module docstring.

    Attributes:
        tiles: int32 ``(B, H, n_q_blocks, n_k_blocks)``, ``B`` 1 or the batch
            size, ``H`` 1 or the number of query heads.
        patterns: bool ``(n_patterns, block_q, block_k)``.
        seqlen_q, seqlen_k: the sequence lengths the mask is for.
        block_size: ``(block_q, block_k)``, powers of two >= 16.
    """

    def __init__(self, tiles: torch.Tensor, patterns: torch.Tensor, seqlen_q: int, seqlen_k: int,
                 block_size: tuple[int, int]):
        self.tiles = tiles
        self.patterns = patterns
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        self.block_size = block_size
        self._lists: KernelLists | None = None
        self._causal: dict[int, BlockMask] = {}

    # -- construction ------------------------------------------------------------

    @classmethod
    def _normalised(cls, tiles: torch.Tensor, patterns: torch.Tensor, seqlen_q: int, seqlen_k: int,
                    block_size: tuple[int, int]) -> "BlockMask":
        """The canonical mask from any ``tiles`` / ``patterns`` (a pattern may be shared
        by tiles at different positions): bounds applied to the patterns of tiles
        at the sequence ends, all-False tiles made EMPTY, all-True tiles inside the
        keys made FULL, tiles past the keys' end made partial, patterns deduplicated."""
        bq, bk = block_size
        device = tiles.device
        tiles = tiles.to(torch.int64).clone()
        n_q, n_k = tiles.shape[-2:]
        rows = torch.arange(bq, device=device)
        cols = torch.arange(bk, device=device)
        patterns = patterns.to(device=device, dtype=torch.bool).reshape(-1, bq, bk)
        # full tiles that cross the end of the keys get a pattern
        k_tail = seqlen_k % bk != 0
        if k_tail:
            last = tiles[..., n_k - 1]
            ones = torch.ones(1, bq, bk, dtype=torch.bool, device=device)
            last[last == FULL] = patterns.shape[0]
            patterns = torch.cat([patterns, ones])
        # patterns at the ends, per tile; the others shared
        q_tail = seqlen_q % bq != 0
        edge = torch.zeros(n_q, n_k, dtype=torch.bool, device=device)
        if q_tail:
            edge[-1, :] = True
        if k_tail:
            edge[:, -1] = True
        edge = edge.expand(tiles.shape) & (tiles >= 0)
        if edge.any():
            where = edge.nonzero()
            qb, kb = where[:, -2], where[:, -1]
            pats = patterns[tiles[edge]]
            row_ok = (qb[:, None] * bq + rows[None, :] < seqlen_q)[:, :, None]
            col_ok = (kb[:, None] * bk + cols[None, :] < seqlen_k)[:, None, :]
            pats = pats & row_ok & col_ok
            # rows past seqlen_q do not count: a tile is full if its real rows are all True
            full = (pats | ~row_ok).all(-1).all(-1) & col_ok.all(-1).all(-1)
            ids = torch.arange(patterns.shape[0], patterns.shape[0] + pats.shape[0], device=device)
            tiles[edge] = torch.where(full, FULL, torch.where(pats.any(-1).any(-1), ids, EMPTY))
            patterns = torch.cat([patterns, pats])
        # interior patterns: decided per pattern
        if patterns.shape[0]:
            kinds = torch.where(patterns.all(-1).all(-1), FULL, torch.where(patterns.any(-1).any(-1), 0, EMPTY))
            part = tiles >= 0
            ids = tiles[part]
            kind = kinds[ids]
            tiles[part] = torch.where(kind < 0, kind, ids)
        # keep only the patterns in use, each once
        part = tiles >= 0
        if part.any():
            used, inverse = torch.unique(tiles[part], return_inverse=True)
            uniq, pat_inverse = torch.unique(patterns[used].reshape(used.numel(), -1), dim=0, return_inverse=True)
            tiles[part] = pat_inverse[inverse]
            patterns = uniq.reshape(-1, bq, bk)
        else:
            patterns = torch.zeros(0, bq, bk, dtype=torch.bool, device=device)
        return cls(tiles.to(torch.int32).contiguous(), patterns.contiguous(), seqlen_q, seqlen_k, block_size)

    @classmethod
    def from_layout(cls, layout: torch.Tensor, block_size=128, seqlen_q: int | None = None,
                    seqlen_k: int | None = None) -> "BlockMask":
        """A mask whose tiles are full where ``layout`` is True and empty elsewhere.

        Args:
            layout: bool ``(n_q_blocks, n_k_blocks)``, ``(H, nq, nk)`` or
                ``(B, H, nq, nk)`` (B and H may be 1, broadcast).
            block_size (int | tuple[int, int]): ``block_q = block_k``, or a pair;
                powers of two >= 16.
            seqlen_q: defaults to the layout's extent (``n_q_blocks * block_q``).
            seqlen_k: defaults to the layout's extent; tiles past the end of
                the keys are cut (partial).
        """
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or not 2 <= layout.dim() <= 4:
            raise FlashtileValueError("flashtile: layout must be a bool tensor (n_q_blocks, n_k_blocks), (H, nq, nk) or "
                             f"(B, H, nq, nk), got {getattr(layout, 'dtype', type(layout).__name__)} "
                             f"{tuple(getattr(layout, 'shape', ()))}")
        bq, bk = _pair(block_size)
        layout = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))
        n_q, n_k = layout.shape[-2:]
        seqlen_q = n_q * bq if seqlen_q is None else _check_seqlen("seqlen_q", seqlen_q)
        seqlen_k = n_k * bk if seqlen_k is None else _check_seqlen("seqlen_k", seqlen_k)
        if (-(-seqlen_q // bq), -(-seqlen_k // bk)) != (n_q, n_k):
            raise FlashtileValueError(f"flashtile: a layout of {n_q} x {n_k} blocks of {bq} x {bk} does not cover "
                             f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")
        tiles = torch.where(layout, FULL, EMPTY)
        patterns = torch.zeros(0, bq, bk, dtype=torch.bool, device=layout.device)
        return cls._normalised(tiles, patterns, seqlen_q, seqlen_k, (bq, bk))

    @classmethod
    def causal(cls, seqlen_q: int, seqlen_k: int, block_size=128, align: str = "bottom_right",
               device=None) -> "BlockMask":
        """The causal mask: query ``i`` sees keys ``j <= i + offset``, ``offset =
        seqlen_k - seqlen_q`` (``align="bottom_right"``, flash_attn's) or 0
        (``"top_left"``, PyTorch SDPA's). Built per tile, without evaluating
        every element."""
        from ..options import causal_offset_for

        bq, bk = _pair(block_size)
        diag = causal_offset_for(_check_seqlen("seqlen_q", seqlen_q), _check_seqlen("seqlen_k", seqlen_k), align)
        n_q, n_k = -(-seqlen_q // bq), -(-seqlen_k // bk)
        q0 = torch.arange(n_q, device=device)[:, None] * bq
        k0 = torch.arange(n_k, device=device)[None, :] * bk
        last_row = torch.clamp(q0 + bq, max=seqlen_q) - 1
        full = k0 + bk - 1 <= q0 + diag
        empty = k0 > last_row + diag
        partial = ~full & ~empty
        where = partial.nonzero()
        rows = where[:, 0, None, None] * bq + torch.arange(bq, device=device)[None, :, None]
        cols = where[:, 1, None, None] * bk + torch.arange(bk, device=device)[None, None, :]
        patterns = cols <= rows + diag
        tiles = torch.where(full, FULL, EMPTY).to(torch.int64)
        tiles[partial] = torch.arange(where.shape[0], device=device)
        return cls._normalised(tiles[None, None], patterns, seqlen_q, seqlen_k, (bq, bk))

    # -- combination ---------------------------------------------------------------

    def _combine(self, other: "BlockMask", is_and: bool) -> "BlockMask":
        if not isinstance(other, BlockMask):
            return NotImplemented
        if (self.seqlen_q, self.seqlen_k, self.block_size) != (other.seqlen_q, other.seqlen_k, other.block_size):
            raise FlashtileValueError("flashtile: block masks combine only with the same seqlen_q, seqlen_k and block_size, "
                             f"got {(self.seqlen_q, self.seqlen_k, self.block_size)} and "
                             f"{(other.seqlen_q, other.seqlen_k, other.block_size)}")
        try:
            a, b = torch.broadcast_tensors(self.tiles.to(torch.int64),
                                           other.tiles.to(torch.int64).to(self.tiles.device))
        except RuntimeError:
            raise FlashtileValueError("flashtile: block masks combine only when their (batch, heads) sizes broadcast, got "
                             f"{tuple(self.tiles.shape[:2])} and {tuple(other.tiles.shape[:2])}") from None
        if is_and:
            empty = (a == EMPTY) | (b == EMPTY)
            full = (a == FULL) & (b == FULL)
        else:
            empty = (a == EMPTY) & (b == EMPTY)
            full = (a == FULL) | (b == FULL)
        partial = ~empty & ~full
        tiles = torch.where(full, FULL, EMPTY)
        bq, bk = self.block_size
        patterns = torch.zeros(0, bq, bk, dtype=torch.bool, device=tiles.device)
        if partial.any():
            pairs, inverse = torch.unique(torch.stack([a[partial], b[partial]], -1), dim=0, return_inverse=True)

            def expand(ids, pats):
                # EMPTY -> all False, FULL -> all True, else the pattern
                table = torch.cat([torch.zeros(1, bq, bk, dtype=torch.bool, device=tiles.device),
                                   torch.ones(1, bq, bk, dtype=torch.bool, device=tiles.device),
                                   pats.to(tiles.device)])
                return table[ids + 2]

            pa, pb = expand(pairs[:, 0], self.patterns), expand(pairs[:, 1], other.patterns)
            patterns = pa & pb if is_and else pa | pb
            tiles = tiles.clone()
            tiles[partial] = inverse
        return BlockMask._normalised(tiles, patterns, self.seqlen_q, self.seqlen_k, self.block_size)

    def __and__(self, other: "BlockMask") -> "BlockMask":
        """Pairs allowed by both masks."""
        return self._combine(other, True)

    def __or__(self, other: "BlockMask") -> "BlockMask":
        """Pairs allowed by either mask."""
        return self._combine(other, False)

    def causal_part(self, align: str = "bottom_right") -> "BlockMask":
        """This mask combined with the causal mask (cached per alignment)."""
        from ..options import causal_offset_for

        diag = causal_offset_for(self.seqlen_q, self.seqlen_k, align)
        if diag not in self._causal:
            self._causal[diag] = self & BlockMask.causal(self.seqlen_q, self.seqlen_k, self.block_size, align,
                                                         self.tiles.device)
        return self._causal[diag]

    # -- inspection ---------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.tiles.shape)

    @property
    def device(self) -> torch.device:
        return self.tiles.device

    def density(self) -> float:
        """Fraction of the tiles that are not empty (what the kernels compute)."""
        return (self.tiles != EMPTY).float().mean().item() if self.tiles.numel() else 0.0

    def to(self, device) -> "BlockMask":
        return BlockMask(self.tiles.to(device), self.patterns.to(device), self.seqlen_q, self.seqlen_k,
                         self.block_size)

    def to_dense(self) -> torch.Tensor:
        """The element mask, bool ``(B, H, seqlen_q, seqlen_k)`` (True = attend). Quadratic
        memory: for tests and inspection."""
        bq, bk = self.block_size
        b, h, n_q, n_k = self.tiles.shape
        elems = self._tile_elements(self.tiles)  # (b, h, nq, nk, bq, bk)
        dense = elems.permute(0, 1, 2, 4, 3, 5).reshape(b, h, n_q * bq, n_k * bk)
        return dense[..., :self.seqlen_q, :self.seqlen_k]

    def _tile_elements(self, tiles: torch.Tensor) -> torch.Tensor:
        """The element masks ``(..., block_q, block_k)`` of tiles given by kind/pattern id."""
        bq, bk = self.block_size
        table = torch.cat([torch.zeros(1, bq, bk, dtype=torch.bool, device=tiles.device),
                           torch.ones(1, bq, bk, dtype=torch.bool, device=tiles.device), self.patterns])
        return table[tiles.to(torch.int64) + 2]

    def tile_elements(self, q_block: int, k_block: int) -> torch.Tensor | None:
        """Element masks ``(B, H, block_q, block_k)`` of one tile position for every
        (batch, head), or None if the tile is empty for all of them."""
        tiles = self.tiles[..., q_block, k_block]
        if bool((tiles == EMPTY).all()):
            return None
        return self._tile_elements(tiles)

    def kernel_lists(self) -> KernelLists:
        """The tile lists the kernels iterate over (computed once, then cached)."""
        if self._lists is None:
            fwd_full, fwd_part = _lists(self.tiles)
            bwd_full, bwd_part = _lists(self.tiles.transpose(-1, -2))
            self._lists = KernelLists(fwd_full, fwd_part, bwd_full, bwd_part, pack_bits(self.patterns))
        return self._lists

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, seqlen_q={self.seqlen_q}, "
                f"seqlen_k={self.seqlen_k}, density={self.density():.3f}, patterns={self.patterns.shape[0]})")


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, seqlen_q: int, seqlen_k: int,
                      block_size=128, device=None) -> BlockMask:
    """A ``BlockMask`` from a predicate, as FlexAttention's ``create_block_mask``.

    ``mask_mod(b, h, q_idx, kv_idx)`` gets int64 index tensors that broadcast
    to ``(B, H, rows, cols)`` (``b`` ``(B, 1, 1, 1)``, ``h`` ``(1, H, 1, 1)``,
    ``q_idx`` ``(1, 1, rows, 1)``, ``kv_idx`` ``(1, 1, 1, cols)``) and returns
    a bool tensor that broadcasts to that shape (True = attend). It is
    evaluated on chunks of query blocks, so memory stays bounded; indices
    are clamped to the sequences, so a predicate may index tensors of length
    seqlen_q / seqlen_k.

    Args:
        mask_mod: the predicate ``mask_mod(b, h, q_idx, kv_idx)``.
        B: batch size the predicate depends on; None (or 1) when it does not
            (the mask is broadcast over the batch).
        H: number of query heads the predicate depends on; None (or 1) when
            it does not (the mask is broadcast over the heads).
        seqlen_q: number of queries.
        seqlen_k: number of keys.
        block_size (int | tuple[int, int]): ``block_q = block_k``, or a pair;
            powers of two >= 16.
        device (torch.device | str | None): where to evaluate and keep the mask.
    """
    if not callable(mask_mod):
        raise FlashtileTypeError(f"flashtile: mask_mod must be callable, got {type(mask_mod).__name__}")
    bq, bk = _pair(block_size)
    seqlen_q, seqlen_k = _check_seqlen("seqlen_q", seqlen_q), _check_seqlen("seqlen_k", seqlen_k)
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, n in (("B", B), ("H", H)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise FlashtileValueError(f"flashtile: {name} must be a positive int or None, got {n!r}")
    n_q, n_k = -(-seqlen_q // bq), -(-seqlen_k // bk)
    b_idx = torch.arange(B, device=device).reshape(B, 1, 1, 1)
    h_idx = torch.arange(H, device=device).reshape(1, H, 1, 1)
    kv_pos = torch.arange(n_k * bk, device=device)
    kv_idx = kv_pos.clamp(max=max(seqlen_k - 1, 0)).reshape(1, 1, 1, -1)
    col_ok = kv_pos < seqlen_k
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * bq * n_k * bk))
    tiles = torch.empty(B, H, n_q, n_k, dtype=torch.int64, device=device)
    patterns = []
    n_patterns = 0
    for c0 in range(0, n_q, chunk):
        c1 = min(n_q, c0 + chunk)
        q_pos = torch.arange(c0 * bq, c1 * bq, device=device)
        q_idx = q_pos.clamp(max=max(seqlen_q - 1, 0)).reshape(1, 1, -1, 1)
        allowed = torch.as_tensor(mask_mod(b_idx, h_idx, q_idx, kv_idx), device=device)
        if allowed.dtype != torch.bool:
            raise FlashtileTypeError(f"flashtile: mask_mod must return a bool tensor, got {allowed.dtype}")
        try:
            allowed = torch.broadcast_to(allowed, (B, H, q_pos.numel(), kv_pos.numel()))
        except RuntimeError:
            raise FlashtileValueError(f"flashtile: mask_mod returned shape {tuple(allowed.shape)}, which does not broadcast "
                             f"to (B, H, q_idx, kv_idx) = {(B, H, q_pos.numel(), kv_pos.numel())}") from None
        # rows past seqlen_q copy the last row (don't care); keys past seqlen_k are never allowed
        allowed = allowed & col_ok
        elems = allowed.reshape(B, H, c1 - c0, bq, n_k, bk).transpose(3, 4)  # (B, H, c, nk, bq, bk)
        full = elems.all(-1).all(-1)
        some = elems.any(-1).any(-1)
        part = some & ~full
        block = torch.where(full, FULL, EMPTY)
        if part.any():
            uniq, inverse = torch.unique(elems[part].reshape(-1, bq * bk), dim=0, return_inverse=True)
            block[part] = inverse + n_patterns
            patterns.append(uniq.reshape(-1, bq, bk))
            n_patterns += uniq.shape[0]
        tiles[:, :, c0:c1] = block
    patterns = torch.cat(patterns) if patterns else torch.zeros(0, bq, bk, dtype=torch.bool, device=device)
    return BlockMask._normalised(tiles, patterns, seqlen_q, seqlen_k, (bq, bk))
