"""Ready-made block-sparse attention patterns.

Each builder returns a ``BlockMask`` for
``flashtile.block_sparse_attn_func``:

* ``local_global_block_mask``: Longformer's sliding window plus global tokens.
* ``strided_block_mask`` and ``fixed_block_mask``: the Sparse
  Transformer's strided and fixed patterns (Child et al., 2019).
* ``bigbird_block_mask``: BigBird's random, sliding-window and global blocks.
* ``document_block_mask``: packed sequences, attention within each document
  (``document_ids_from_lengths`` turns document lengths into ids).

The element-level patterns are predicates ``mask_mod(b, h, q_idx, kv_idx)``
(``local_global_mask_mod``, ``strided_mask_mod``,
``fixed_mask_mod``, ``document_mask_mod``) evaluated by
``create_block_mask`` a chunk of query blocks at a
time, so memory stays bounded; they are exported so they can be combined
(``and_masks``, ``or_masks``) and passed to ``create_block_mask``
directly. BigBird is defined per block and is built from a block layout.

Every builder takes ``block_size`` (a power of two >= 16, or a pair ``(block_q,
block_k)``), ``device`` and ``causal``: ``causal=True`` also restricts query
``i`` to keys ``j <= i + seqlen_k - seqlen_q`` (the causal mask aligned
bottom-right, flash_attn's; ``j <= i`` for the square masks), which is what
``block_sparse_attn_func(..., causal=True)`` does, baked into the mask.
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from .block_mask import BlockMask, _pair, create_block_mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "and_masks",
    "bigbird_block_mask",
    "document_block_mask",
    "document_ids_from_lengths",
    "document_mask_mod",
    "fixed_block_mask",
    "fixed_mask_mod",
    "local_global_block_mask",
    "local_global_mask_mod",
    "or_masks",
    "strided_block_mask",
    "strided_mask_mod",
]


# -- argument checks ---------------------------------------------------------------

def _int_arg(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: they are not counts)."""
    if isinstance(value, bool):
        raise FlashtileTypeError(f"flashtile: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise FlashtileTypeError(f"flashtile: {name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise FlashtileValueError(f"flashtile: {name} must be an int >= {minimum}, got {value}")
    return value


def _optional_int_arg(name: str, value, minimum: int = 1) -> int | None:
    return None if value is None else _int_arg(name, value, minimum)


def _check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise FlashtileTypeError(f"flashtile: causal must be a bool, got {type(causal).__name__}")
    return causal


def _device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise FlashtileValueError(f"flashtile: device must be a torch.device or a device string, got {device!r}") from e


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _int_tensor(name: str, value) -> torch.Tensor:
    """``value`` (tensor or sequence of ints) as an integer tensor."""
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise FlashtileTypeError(f"flashtile: {name} must be an integer tensor or a sequence of ints, "
                            f"got {type(value).__name__}") from e
        if t.numel() == 0:
            t = t.to(torch.int64)  # an empty list comes back float
    if not _is_integer_dtype(t.dtype):
        raise FlashtileTypeError(f"flashtile: {name} must hold integers, got {t.dtype}")
    return t


def _global_positions(global_tokens, seqlen: int | None) -> tuple[int, torch.Tensor | None]:
    """``global_tokens`` as ``(count, None)`` (the first ``count`` tokens) or ``(0,
    positions)`` (int64, sorted, unique)."""
    if isinstance(global_tokens, bool):
        raise FlashtileTypeError("flashtile: global_tokens must be an int count, positions or a bool mask, got bool")
    if not isinstance(global_tokens, (torch.Tensor, Sequence)) or (
            isinstance(global_tokens, torch.Tensor) and global_tokens.dim() == 0):
        count = _int_arg("global_tokens", global_tokens, 0)
        return (count if seqlen is None else min(count, seqlen)), None
    if isinstance(global_tokens, torch.Tensor) and global_tokens.dtype == torch.bool:
        if global_tokens.dim() != 1 or (seqlen is not None and global_tokens.numel() != seqlen):
            expected = "seqlen" if seqlen is None else seqlen
            raise FlashtileValueError(f"flashtile: global_tokens as a bool mask must have shape ({expected},), "
                             f"got {tuple(global_tokens.shape)}")
        return 0, global_tokens.nonzero().flatten()
    positions = _int_tensor("global_tokens", global_tokens)
    if positions.dim() > 1:
        raise FlashtileValueError(f"flashtile: global_tokens positions must be 1-D, got shape {tuple(positions.shape)}")
    positions = positions.reshape(-1).to(torch.int64)
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or (seqlen is not None and hi >= seqlen):
            bound = f"[0, {seqlen})" if seqlen is not None else ">= 0"
            raise FlashtileValueError(f"flashtile: global_tokens positions must be in {bound}, got {lo}..{hi}")
    return 0, torch.unique(positions)


def _document_ids(document_ids, document_ids_k) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key document ids, both 1-D or both 2-D ``(batch, seqlen)`` (batch
    broadcast where one of them has 1)."""
    ids = []
    for name, t in (("document_ids", document_ids), ("document_ids_k", document_ids_k)):
        if not isinstance(t, torch.Tensor):
            raise FlashtileTypeError(f"flashtile: {name} must be a tensor, got {type(t).__name__}")
        if not _is_integer_dtype(t.dtype):
            raise FlashtileTypeError(f"flashtile: {name} must be an integer tensor, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise FlashtileValueError(f"flashtile: {name} must be (seqlen,) or (batch, seqlen), got shape {tuple(t.shape)}")
        ids.append(t)
    doc_q, doc_k = ids
    if doc_q.device != doc_k.device:
        raise FlashtileValueError(f"flashtile: document_ids is on {doc_q.device} and document_ids_k on {doc_k.device}")
    if doc_q.dim() == doc_k.dim() == 1:
        return doc_q, doc_k
    doc_q, doc_k = doc_q.reshape(-1, doc_q.shape[-1]), doc_k.reshape(-1, doc_k.shape[-1])
    batch = max(doc_q.shape[0], doc_k.shape[0])
    if doc_q.shape[0] not in (1, batch) or doc_k.shape[0] not in (1, batch) or batch == 0:
        raise FlashtileValueError(f"flashtile: document_ids and document_ids_k have batch sizes {doc_q.shape[0]} and "
                         f"{doc_k.shape[0]}; they must be equal (or one of them 1), and not 0")
    # views: no copy
    return doc_q.expand(batch, -1), doc_k.expand(batch, -1)


def _finish(mask: BlockMask, causal: bool) -> BlockMask:
    if causal:
        mask = mask & BlockMask.causal(mask.seqlen_q, mask.seqlen_k, mask.block_size, "bottom_right", mask.device)
    return mask


# -- predicates ----------------------------------------------------------------------

def local_global_mask_mod(window: int, global_tokens=0) -> MaskMod:
    """Longformer's rule: query ``i`` sees key ``j`` iff ``|i - j| <= window``, or ``i``
    or ``j`` is a global token (global tokens see every key and every query sees them).

    Args:
        window: keys seen on each side of the query, an int >= 0 (``2 window + 1``
            keys in all away from the ends).
        global_tokens (int | Sequence[int] | torch.Tensor): an int ``g`` (tokens
            ``0 .. g - 1`` are global), a sequence or integer tensor of token
            positions, or a bool tensor ``(seqlen,)``.
    """
    window = _int_arg("window", window, 0)
    count, positions = _global_positions(global_tokens, None)

    def mask_mod(b, h, q_idx, kv_idx):
        # |i - j| <= window, without an int64 (rows, cols) difference
        allowed = (kv_idx <= q_idx + window) & (q_idx <= kv_idx + window)
        if count:
            allowed = allowed | (q_idx < count) | (kv_idx < count)
        if positions is not None and positions.numel():
            pos = positions.to(q_idx.device)
            allowed = allowed | torch.isin(q_idx, pos) | torch.isin(kv_idx, pos)
        return allowed

    return mask_mod


def strided_mask_mod(stride: int) -> MaskMod:
    """The Sparse Transformer's strided rule (Child et al., 2019): query ``i`` sees key
    ``j`` iff ``|i - j| < stride`` (the previous and next ``stride - 1`` tokens and
    itself) or ``(i - j) % stride == 0`` (every ``stride``-th token, both ways).
    ``stride`` is an int >= 1; Child et al. take ``stride ~ sqrt(seqlen)``."""
    stride = _int_arg("stride", stride, 1)

    def mask_mod(b, h, q_idx, kv_idx):
        # i - j is a multiple of stride iff i and j have the same residue: arithmetic on the
        # index vectors only, the (rows, cols) broadcast is just compared
        near = (kv_idx < q_idx + stride) & (q_idx < kv_idx + stride)
        return near | (q_idx % stride == kv_idx % stride)

    return mask_mod


def fixed_mask_mod(block_len: int, num_summary: int = 1) -> MaskMod:
    """The Sparse Transformer's fixed rule (Child et al., 2019), ``l = block_len``, ``c
    = num_summary``: query ``i`` sees key ``j`` iff ``j // l == i // l`` (the same
    stretch of ``l`` tokens) or ``j % l >= l - c`` (``j`` is one of the last ``c``
    "summary" tokens of a stretch). ``block_len`` >= 1, ``0 <= num_summary <=
    block_len``."""
    block_len = _int_arg("block_len", block_len, 1)
    num_summary = _int_arg("num_summary", num_summary, 0)
    if num_summary > block_len:
        raise FlashtileValueError(f"flashtile: num_summary must be <= block_len ({block_len}), got {num_summary}")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx // block_len == kv_idx // block_len) | (kv_idx % block_len >= block_len - num_summary)

    return mask_mod


def document_mask_mod(document_ids: torch.Tensor, document_ids_k: torch.Tensor | None = None) -> MaskMod:
    """Packed sequences: query ``i`` sees key ``j`` iff ``document_ids[i] ==
    document_ids_k[j]`` (per batch row ``b`` for 2-D ids).

    Args:
        document_ids: integer ``(seqlen_q,)`` or ``(batch, seqlen_q)``: the document of
            every query (any ids; a document need not be contiguous).
        document_ids_k: the same for the keys, ``(seqlen_k,)`` or ``(batch | 1,
            seqlen_k)``; defaults to ``document_ids`` (self-attention).

    With 2-D ids give ``B=batch`` to ``create_block_mask``. The predicate
    indexes the ids with ``q_idx`` / ``kv_idx``, so they must lie in the
    sequences (``create_block_mask`` clamps them).
    """
    doc_q, doc_k = _document_ids(document_ids, document_ids if document_ids_k is None else document_ids_k)

    def mask_mod(b, h, q_idx, kv_idx):
        dq, dk = doc_q.to(q_idx.device), doc_k.to(q_idx.device)
        if dq.dim() == 1:
            return dq[q_idx] == dk[kv_idx]
        return dq[b, q_idx] == dk[b, kv_idx]

    return mask_mod


def _check_mods(name: str, mask_mods) -> None:
    for i, mod in enumerate(mask_mods):
        if not callable(mod):
            raise FlashtileTypeError(f"flashtile: {name}: mask_mods[{i}] must be callable, got {type(mod).__name__}")


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A predicate allowing the pairs every one of ``mask_mods`` allows (all pairs if none)."""
    _check_mods("and_masks", mask_mods)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for mod in mask_mods:
            allowed = allowed & mod(b, h, q_idx, kv_idx)
        return allowed

    return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A predicate allowing the pairs any one of ``mask_mods`` allows (none if none)."""
    _check_mods("or_masks", mask_mods)

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for mod in mask_mods:
            allowed = allowed | mod(b, h, q_idx, kv_idx)
        return allowed

    return mask_mod


# -- block masks -----------------------------------------------------------------------

def local_global_block_mask(seqlen: int, window: int, global_tokens=0, *, block_size=128, device=None,
                            causal: bool = False) -> BlockMask:
    """Longformer's sliding window with global tokens, a ``(1, 1, n_blocks, n_blocks)``
    mask for ``seqlen_q = seqlen_k = seqlen``.

    Query ``i`` sees key ``j`` iff ``|i - j| <= window`` or ``i`` or ``j`` is a
    global token (``local_global_mask_mod``); with ``causal=True`` also ``j <= i``.

    Args:
        seqlen: the sequence length (queries and keys).
        window: keys seen on each side, an int >= 0.
        global_tokens (int | Sequence[int] | torch.Tensor): an int ``g`` (the first
            ``g`` tokens are global), a sequence or integer tensor of positions in
            ``[0, seqlen)``, or a bool tensor ``(seqlen,)``.
    """
    seqlen = _int_arg("seqlen", seqlen, 0)
    causal, device = _check_causal(causal), _device(device)
    window = _int_arg("window", window, 0)
    count, positions = _global_positions(global_tokens, seqlen)
    mod = local_global_mask_mod(window, count if positions is None else positions.to(device))
    return _finish(create_block_mask(mod, None, None, seqlen, seqlen, block_size, device), causal)


def strided_block_mask(seqlen: int, stride: int, *, block_size=128, device=None, causal: bool = False) -> BlockMask:
    """The Sparse Transformer's strided pattern, a ``(1, 1, n_blocks, n_blocks)`` mask
    for ``seqlen_q = seqlen_k = seqlen``.

    Query ``i`` sees key ``j`` iff ``|i - j| < stride`` or ``(i - j) % stride == 0``
    (``strided_mask_mod``); with ``causal=True`` also ``j <= i``, which is the
    paper's autoregressive form (the last ``stride`` tokens plus every
    ``stride``-th one before them).
    """
    seqlen = _int_arg("seqlen", seqlen, 0)
    causal, device = _check_causal(causal), _device(device)
    mod = strided_mask_mod(stride)
    return _finish(create_block_mask(mod, None, None, seqlen, seqlen, block_size, device), causal)


def fixed_block_mask(seqlen: int, block_len: int, num_summary: int = 1, *, block_size=128, device=None,
                     causal: bool = False) -> BlockMask:
    """The Sparse Transformer's fixed pattern, a ``(1, 1, n_blocks, n_blocks)`` mask for
    ``seqlen_q = seqlen_k = seqlen``.

    With ``l = block_len`` and ``c = num_summary``, query ``i`` sees key ``j`` iff
    ``j // l == i // l`` or ``j % l >= l - c`` (``fixed_mask_mod``); with
    ``causal=True`` also ``j <= i`` (the paper's autoregressive form).
    ``block_len`` (the paper's ``l``, a count of tokens) is unrelated to
    ``block_size``, the mask's tile size.
    """
    seqlen = _int_arg("seqlen", seqlen, 0)
    causal, device = _check_causal(causal), _device(device)
    mod = fixed_mask_mod(block_len, num_summary)
    return _finish(create_block_mask(mod, None, None, seqlen, seqlen, block_size, device), causal)


def bigbird_block_mask(seqlen: int, num_random_blocks: int, window_blocks: int = 1, global_blocks: int = 1,
                       seed: int = 0, batch: int | None = None, heads: int | None = None, *, block_size=128,
                       device=None, causal: bool = False) -> BlockMask:
    """BigBird's pattern at block granularity, for ``seqlen_q = seqlen_k = seqlen``.

    With blocks of ``block_size`` tokens (square: one int or an equal pair), query
    block ``p`` sees key block ``r`` iff any of:

    * ``|p - r| <= window_blocks`` (sliding window of blocks),
    * ``p < global_blocks`` or ``r < global_blocks`` (the first blocks are global),
    * ``r`` is one of the ``num_random_blocks`` blocks drawn for ``p``: uniformly,
      without replacement, among the key blocks not already seen through the
      window or the global blocks (all of them when fewer remain), and with
      ``causal=True`` among those with ``r <= p`` only.

    Every element of a seen block is allowed (keys past ``seqlen`` excepted); with
    ``causal=True`` the mask is then restricted to ``j <= i`` element by element.

    The draws come from a CPU ``torch.Generator`` seeded with ``seed``, so a seed
    gives the same mask on every device; they are drawn independently for every
    (batch, head) when ``batch`` / ``heads`` are given, the mask then being
    ``(batch | 1, heads | 1, n_blocks, n_blocks)``.
    """
    seqlen = _int_arg("seqlen", seqlen, 0)
    causal, device = _check_causal(causal), _device(device)
    num_random = _int_arg("num_random_blocks", num_random_blocks, 0)
    window = _int_arg("window_blocks", window_blocks, 0)
    n_global = _int_arg("global_blocks", global_blocks, 0)
    seed = _int_arg("seed", seed, 0)
    b = _optional_int_arg("batch", batch) or 1
    h = _optional_int_arg("heads", heads) or 1
    bq, bk = _pair(block_size)
    if bq != bk:
        raise FlashtileValueError(f"flashtile: bigbird_block_mask needs square blocks (its pattern is per block), "
                         f"got block_size={block_size!r}")
    n = -(-seqlen // bq)
    q_blk = torch.arange(n)[:, None]
    k_blk = torch.arange(n)[None, :]
    fixed = ((q_blk - k_blk).abs() <= window) | (q_blk < n_global) | (k_blk < n_global)  # (n, n)
    candidates = ~fixed
    if causal:
        candidates &= k_blk <= q_blk
    layout = fixed.expand(b, h, n, n)
    n_draw = min(num_random, n)
    if n_draw:
        gen = torch.Generator().manual_seed(seed)
        # the n_draw smallest of uniform scores form a uniform draw without replacement;
        # non-candidates score 2 (past every uniform) and are dropped below if picked
        scores = torch.rand(b, h, n, n, generator=gen).masked_fill(~candidates, 2.0)
        picked = scores.topk(n_draw, dim=-1, largest=False).indices
        drawn = torch.zeros(b, h, n, n, dtype=torch.bool).scatter_(-1, picked, True) & candidates
        layout = layout | drawn
    mask = BlockMask.from_layout(layout.to(device).contiguous(), (bq, bk), seqlen, seqlen)
    return _finish(mask, causal)


def document_block_mask(document_ids: torch.Tensor, document_ids_k: torch.Tensor | None = None, *, block_size=128,
                        device=None, causal: bool = False) -> BlockMask:
    """Attention within documents of packed sequences.

    Query ``i`` sees key ``j`` iff ``document_ids[i] == document_ids_k[j]`` (per
    batch row for 2-D ids; ``document_mask_mod``); with ``causal=True`` also
    ``j <= i + seqlen_k - seqlen_q`` (bottom-right), which for ``seqlen_q ==
    seqlen_k`` and contiguous documents is causal attention within each document.

    Args:
        document_ids: integer ``(seqlen_q,)`` or ``(batch, seqlen_q)``.
        document_ids_k: integer ``(seqlen_k,)`` or ``(batch | 1, seqlen_k)``; defaults
            to ``document_ids``.
        device (torch.device | str | None): defaults to the ids' device.

    Returns:
        A ``(1, 1, ...)`` mask for 1-D ids, ``(batch, 1, ...)`` for 2-D ones.
    """
    causal = _check_causal(causal)
    doc_q, doc_k = _document_ids(document_ids, document_ids if document_ids_k is None else document_ids_k)
    device = doc_q.device if device is None else _device(device)
    doc_q, doc_k = doc_q.to(device), doc_k.to(device)
    batch = doc_q.shape[0] if doc_q.dim() == 2 else None
    mod = document_mask_mod(doc_q, doc_k)
    mask = create_block_mask(mod, batch, None, doc_q.shape[-1], doc_k.shape[-1], block_size, device)
    return _finish(mask, causal)


def document_ids_from_lengths(lengths, device=None) -> torch.Tensor:
    """Document ids of packed sequences from the documents' lengths.

    Args:
        lengths (torch.Tensor | Sequence): ints >= 0, ``(n_docs,)`` or ``(batch,
            n_docs)`` (a tensor or nested sequences); every batch row must have
            the same total (pad with zeros).
        device (torch.device | str | None): defaults to ``lengths``' device.

    Returns:
        int64 ``(total,)`` or ``(batch, total)``: document ``d`` (its index in the
            row) repeated ``lengths[..., d]`` times, e.g. ``[2, 3] -> [0, 0, 1, 1, 1]``.
    """
    t = _int_tensor("lengths", lengths)
    device = t.device if device is None else _device(device)
    if t.dim() not in (1, 2):
        raise FlashtileValueError(f"flashtile: lengths must be (n_docs,) or (batch, n_docs), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise FlashtileValueError(f"flashtile: lengths must be >= 0, got {int(t.min())}")
    totals = t.sum(-1)
    if t.dim() == 2 and totals.numel() and not bool((totals == totals[0]).all()):
        raise FlashtileValueError(f"flashtile: every batch row of lengths must have the same total, got {totals.tolist()}")
    total = int(totals.reshape(-1)[0]) if totals.numel() else 0
    ids = torch.arange(t.shape[-1], device=device).expand_as(t)
    return torch.repeat_interleave(ids.reshape(-1), t.reshape(-1)).reshape(*t.shape[:-1], total)
