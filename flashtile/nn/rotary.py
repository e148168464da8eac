"""Rotary position embedding as a module, with flash_attn's ``RotaryEmbedding``
arguments."""

from __future__ import annotations

import torch

from ..errors import FlashtileValueError
from ..interface.rotary import apply_rotary_emb


class RotaryEmbedding(torch.nn.Module):
    """Rotary position embedding (RoFormer) of the first ``dim`` dims of each head.

    Args:
        dim: the rotary dims (even, at most the head dim).
        base: the base of the angles' frequencies: dim pair ``i`` turns by
            ``position * base ** (-2 i / dim)``.
        interleaved: rotate pairs of neighbouring dims (GPT-J) instead of the two
            halves of the rotary dims (GPT-NeoX).
        scale_base: xPos scaling; not built (``NotImplementedError``).
        device: where the frequencies live.

    The cos/sin tables are computed and kept in fp32 for positions up to the
    longest seen so far; the rotation itself runs in fp32 too.
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False, scale_base: float | None = None,
                 device=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise FlashtileValueError(f"flashtile: RotaryEmbedding dim must be an even int >= 2, got {dim!r}")
        if scale_base is not None:
            raise NotImplementedError("flashtile: RotaryEmbedding with scale_base (xPos)")
        self.dim, self.base, self.interleaved = dim, float(base), bool(interleaved)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, fp32 ``(at least seqlen, dim / 2)``: the angles of positions 0, 1, ..."""
        cached = self._cache
        if cached is None or cached[0] < seqlen or cached[1] != device:
            length = max(seqlen, cached[0] if cached is not None and cached[1] == device else 0)
            positions = torch.arange(length, device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.to(device))
            cached = self._cache = (length, device, angles.cos(), angles.sin())
        return cached[2], cached[3]

    def forward(self, q: torch.Tensor, k: torch.Tensor | None = None, seqlen_offset: int | torch.Tensor = 0,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        """Rotate ``q`` and ``k`` (new tensors).

        Args:
            q: ``(batch, seqlen, nheads, headdim)``, or ``(total, nheads, headdim)``
                with ``cu_seqlens``.
            k: like ``q`` with its own number of heads, or None.
            seqlen_offset: the position of each sequence's first token (an int, or
                an int tensor ``(batch,)``, e.g. the lengths already in a KV cache).
            cu_seqlens: int32 ``(batch + 1,)`` offsets of packed sequences.
            max_seqlen: the longest packed sequence.

        Returns:
            (torch.Tensor | tuple): the rotated ``q``, or ``(q, k)``.
        """
        seqlen = int(max_seqlen) if cu_seqlens is not None else q.shape[1]
        if isinstance(seqlen_offset, torch.Tensor):
            first = int(seqlen_offset.max()) if seqlen_offset.numel() else 0
        else:
            first = int(seqlen_offset)
        cos, sin = self.cos_sin(max(first + seqlen, 1), q.device)
        kw = dict(interleaved=self.interleaved, seqlen_offsets=seqlen_offset, cu_seqlens=cu_seqlens,
                  max_seqlen=max_seqlen)
        q = apply_rotary_emb(q, cos, sin, **kw)
        return q if k is None else (q, apply_rotary_emb(k, cos, sin, **kw))
