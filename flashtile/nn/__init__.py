"""Modules for model code: :class:`MultiheadAttention` (flash_attn's ``MHA``
arguments, GQA, rotary, sliding window, softcap, padding masks routed to
variable-length attention, incremental decoding over a ``KVCache``) and
:class:`RotaryEmbedding`."""

from .mha import MultiheadAttention
from .rotary import RotaryEmbedding

__all__ = ["MultiheadAttention", "RotaryEmbedding"]
