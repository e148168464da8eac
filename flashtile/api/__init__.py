"""Public API layer: argument checking, layouts, autograd and torch.library ops."""

from .autotune import set_autotune
from .block_mask import BlockMask, create_block_mask
from .block_sparse import block_sparse_attention, block_sparse_attn_func
from .cosine_sim import flash_cosine_sim_attention, l2norm_tensors
from .flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .kvcache import KVCache, apply_rotary_emb, flash_attn_with_kvcache
from .merge import merge_attention_states
from .padding import pad_input, unpad_input
from .sparse_patterns import (
    and_masks,
    bigbird_block_mask,
    document_block_mask,
    document_ids_from_lengths,
    fixed_block_mask,
    local_global_block_mask,
    or_masks,
    strided_block_mask,
)
from .sdpa import scaled_dot_product_attention

__all__ = [
    "BlockMask",
    "KVCache",
    "and_masks",
    "apply_rotary_emb",
    "bigbird_block_mask",
    "block_sparse_attention",
    "block_sparse_attn_func",
    "create_block_mask",
    "document_block_mask",
    "document_ids_from_lengths",
    "fixed_block_mask",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flash_cosine_sim_attention",
    "l2norm_tensors",
    "local_global_block_mask",
    "merge_attention_states",
    "or_masks",
    "pad_input",
    "scaled_dot_product_attention",
    "set_autotune",
    "strided_block_mask",
    "unpad_input",
]
