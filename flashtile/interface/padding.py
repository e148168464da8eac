"""Between a padded batch and the packed form of the varlen functions
(the helpers flash_attn users know from ``flash_attn.bert_padding``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FlashtileValueError


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the tokens that ``attention_mask`` keeps.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: bool or 0/1 ``(batch, seqlen)``, True/1 for real tokens.

    Returns:
        packed (torch.Tensor): ``(total, ...)``, the kept tokens one sequence after another.
        indices (torch.Tensor): int64 ``(total,)``, their positions in the
            flattened ``batch * seqlen``.
        cu_seqlens (torch.Tensor): int32 ``(batch + 1,)``, the sequences' offsets.
        max_seqlen (int): the longest sequence.
        seqused (torch.Tensor): int32 ``(batch,)``, tokens per sequence.
    """
    if attention_mask.shape != hidden_states.shape[:2]:
        raise FlashtileValueError(f"flashtile: attention_mask must have shape (batch, seqlen) = "
                         f"{tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    seqused = keep.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqused.max()) if seqused.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqused, dim=0, dtype=torch.int32), (1, 0))
    packed = hidden_states.flatten(0, 1).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of ``unpad_input``: ``(total, ...)`` back to ``(batch, seqlen, ...)``, zeros at padding."""
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out = out.index_copy(0, indices, hidden_states)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
