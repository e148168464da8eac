"""flashtile: exact, memory-linear FlashAttention for PyTorch, with Triton kernels.

Two APIs over the same kernels:

* flash_attn 2.x compatible, layout ``(batch, seqlen, nheads, headdim)``:
  :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func`.
* PyTorch SDPA compatible, layout ``(batch, nheads, seqlen, headdim)``:
  :func:`scaled_dot_product_attention`.

Cosine-similarity attention (l2-normalised q and k, fixed scale, no running
row max): :func:`flash_cosine_sim_attention`.

GPU tensors run the Triton kernels; CPU tensors run a tiled PyTorch
implementation of the same algorithm (or the Triton kernels under Triton's
interpreter, ``TRITON_INTERPRET=1``).
"""

from .api import (
    KVCache,
    apply_rotary_emb,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    flash_cosine_sim_attention,
    l2norm_tensors,
    merge_attention_states,
    pad_input,
    scaled_dot_product_attention,
    unpad_input,
)
from .reference import attention_ref, plain_cosine_sim_attention

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "apply_rotary_emb",
    "attention_ref",
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
    "plain_cosine_sim_attention",
    "scaled_dot_product_attention",
    "unpad_input",
]
