"""flashtile: exact, memory-linear FlashAttention for PyTorch, with Triton kernels.

Two APIs over the same kernels:

* flash_attn 2.x compatible, layout ``(batch, seqlen, nheads, headdim)``:
  ``flash_attn_func``, ``flash_attn_qkvpacked_func``,
  ``flash_attn_kvpacked_func``.
* PyTorch SDPA compatible, layout ``(batch, nheads, seqlen, headdim)``:
  ``scaled_dot_product_attention``.

Block-sparse attention (cost proportional to the non-empty tiles of a
``BlockMask``): ``block_sparse_attn_func``,
``block_sparse_attention``, ``create_block_mask``, and ready-made
patterns (``local_global_block_mask``, ``strided_block_mask``,
``fixed_block_mask``, ``bigbird_block_mask``, ``document_block_mask``).

Cosine-similarity attention (l2-normalised q and k, fixed scale, no running
row max): ``flash_cosine_sim_attention``.

GPU tensors run the Triton kernels; CPU tensors run a tiled PyTorch
implementation of the same algorithm (or the Triton kernels under Triton's
interpreter, ``TRITON_INTERPRET=1``).

The package is layered; each folder is one layer, and a feature is found by
following one path down:

* ``interface/``: the public functions, their argument checks and layouts;
* ``ops/``: ``torch.library`` custom ops with autograd; each picks a backend;
* ``masks/``: ``BlockMask`` and its builders;
* ``backends/``: the Triton kernels and their launchers, PyTorch's fused CPU kernel as a
  backend, and the tiled PyTorch path;
* ``fp8/``: the FP8 front end (``flashtile.fp8``, imported on its own):
  ``quantize_qkv`` (FP8 q, k, v with per-tensor, per-head or per-block
  scales, optionally after a random Hadamard rotation of q and k),
  ``hadamard_matrix`` and ``flash_attn_fp8_func``;
* ``testing/``: the materialised oracle (``flashtile.testing.attention_ref``);
  the library never imports it.
"""

from .backends.triton.launch.autotune import set_autotune
from .backends.triton.launch.invariant import batch_invariant, set_batch_invariant
from .errors import FlashtileTypeError, FlashtileValueError
from .interface.block_sparse import block_sparse_attention, block_sparse_attn_func
from .interface.cosine_sim import flash_cosine_sim_attention, l2norm_tensors
from .interface.flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .interface.kvcache import KVCache, flash_attn_with_kvcache
from .interface.rotary import apply_rotary_emb
from .interface.merge import merge_attention_states
from .interface.padding import pad_input, unpad_input
from .interface.sdpa import scaled_dot_product_attention
from .masks.block_mask import BlockMask, create_block_mask
from .masks.patterns import (
    and_masks,
    bigbird_block_mask,
    document_block_mask,
    document_ids_from_lengths,
    fixed_block_mask,
    local_global_block_mask,
    or_masks,
    strided_block_mask,
)

from .integrations import sdpa_flash as _sdpa_flash

__version__ = "0.1.0"

# "flashtile" becomes an implementation of SDPA's flash backend that users may activate
# (torch.nn.attention.activate_flash_attention_impl); importing never activates it
_sdpa_flash.register()

__all__ = [
    "BlockMask",
    "FlashtileTypeError",
    "FlashtileValueError",
    "KVCache",
    "and_masks",
    "batch_invariant",
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
    "set_batch_invariant",
    "strided_block_mask",
    "unpad_input",
]
