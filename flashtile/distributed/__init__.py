"""Context parallelism on ``torch.distributed``: attention over a sequence
sharded across ranks.

* :func:`ring_flash_attn_func`: ring attention; keys and values travel around
  the ranks, each block's result merged by its log-sum-exp (forward and
  backward). Zigzag or contiguous sharding; causal, sliding window, softcap, GQA.
* :func:`ring_flash_attn_varlen_func`: the same over packed documents
  (``cu_seqlens``), each document sharded across the ranks.
* :func:`ulysses_flash_attn_func`: all-to-all from sequence shards to head
  groups, attention over the whole sequence, and back (DeepSpeed-Ulysses).
* :func:`shard`, :func:`unshard` (and the zigzag/contiguous spellings),
  :func:`gather_sequence`: cutting a sequence into the ranks' shards and back;
  :func:`varlen_shard`, :func:`varlen_unshard`: the same, document by document.

Importing this package imports ``torch.distributed``; ``import flashtile``
does not import it.
"""

from .layout import (
    contiguous_shard,
    contiguous_unshard,
    gather_sequence,
    shard,
    unshard,
    varlen_shard,
    varlen_unshard,
    zigzag_shard,
    zigzag_unshard,
)
from .ring import ring_flash_attn_func, ring_flash_attn_varlen_func
from .ulysses import ulysses_flash_attn_func

__all__ = [
    "contiguous_shard",
    "contiguous_unshard",
    "gather_sequence",
    "ring_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "shard",
    "ulysses_flash_attn_func",
    "unshard",
    "varlen_shard",
    "varlen_unshard",
    "zigzag_shard",
    "zigzag_unshard",
]
