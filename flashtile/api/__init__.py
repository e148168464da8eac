"""Public API layer: argument checking, layouts, autograd and torch.library ops."""

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
from .sdpa import scaled_dot_product_attention

__all__ = [
    "KVCache",
    "apply_rotary_emb",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flash_cosine_sim_attention",
    "l2norm_tensors",
    "merge_attention_states",
    "pad_input",
    "scaled_dot_product_attention",
    "unpad_input",
]
