"""flashtile: exact, memory-linear FlashAttention for PyTorch, with Triton kernels.

Two APIs over the same kernels:

* flash_attn 2.x compatible, layout ``(batch, seqlen, nheads, headdim)``:
  :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func`.
* PyTorch SDPA compatible, layout ``(batch, nheads, seqlen, headdim)``:
  :func:`scaled_dot_product_attention`.

Block-sparse attention (cost proportional to the non-empty tiles of a
:class:`BlockMask`): :func:`block_sparse_attn_func`,
:func:`block_sparse_attention`, :func:`create_block_mask`, and ready-made
patterns (:func:`local_global_block_mask`, :func:`strided_block_mask`,
:func:`fixed_block_mask`, :func:`bigbird_block_mask`, :func:`document_block_mask`).

Cosine-similarity attention (l2-normalised q and k, fixed scale, no running
row max): :func:`flash_cosine_sim_attention`.

GPU tensors run the Triton kernels; CPU tensors run a tiled PyTorch
implementation of the same algorithm (or the Triton kernels under Triton's
interpreter, ``TRITON_INTERPRET=1``).
"""

from .api import (
    BlockMask,
    KVCache,
    and_masks,
    apply_rotary_emb,
    bigbird_block_mask,
    block_sparse_attention,
    block_sparse_attn_func,
    create_block_mask,
    document_block_mask,
    document_ids_from_lengths,
    fixed_block_mask,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    flash_cosine_sim_attention,
    l2norm_tensors,
    local_global_block_mask,
    merge_attention_states,
    or_masks,
    pad_input,
    scaled_dot_product_attention,
    set_autotune,
    strided_block_mask,
    unpad_input,
)
from .reference import attention_ref, plain_cosine_sim_attention

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "KVCache",
    "and_masks",
    "apply_rotary_emb",
    "attention_ref",
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
    "plain_cosine_sim_attention",
    "scaled_dot_product_attention",
    "set_autotune",
    "strided_block_mask",
    "unpad_input",
]
