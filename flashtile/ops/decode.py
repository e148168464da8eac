"""The ``flashtile::attn_decode`` custom op (``torch.compile`` traces through it):
attention of a few query tokens against a key/value cache, on the split-KV
Triton kernels for GPU tensors (and under the interpreter), on the tiled
PyTorch path one sequence at a time for CPU tensors.

The cache is either contiguous ``(batch_cache, seqlen_cache, nheads_k, d)``
or paged ``(num_pages, page_size, nheads_k, d)`` with an int32
``block_table`` ``(batch, max_pages)``. Sequence ``b`` attends to keys
``[leftpad[b], cache_seqlens[b] + seqlen_new)`` of its cache; causal, window
and ALiBi positions are aligned to the bottom-right corner.

An fp8 cache (float8_e4m3fn) comes with fp32 descales ``k_descale``,
``v_descale`` ``(batch, nheads_k)``: the real key ``j`` of kv head ``h`` of
sequence ``b`` is ``k_cache[...] * k_descale[b, h]`` (``b`` the call's batch
index, also with ``cache_batch_idx``), and likewise for the values.
"""

from __future__ import annotations

import torch

from ..backends.torch_tiled import attention_tiled_forward
from ..backends.triton.launch.decode import decode_triton
from ..backends.triton.launch.device import cdiv, interpreting
from ..options import AttnOptions, empty_output


def cache_rows(cache: torch.Tensor, b: int, stop: int, cache_batch_idx, block_table) -> torch.Tensor:
    """Keys (or values) ``[0, stop)`` of sequence ``b`` as a ``(stop, nheads_k, d)`` tensor;
    ``cache_batch_idx`` names its cache row or block_table row."""
    row = b if cache_batch_idx is None else int(cache_batch_idx[b])
    if block_table is None:
        return cache[row, :stop]
    page_size = cache.shape[1]
    pages = block_table[row, :cdiv(stop, page_size)].long()
    return cache[pages].flatten(0, 1)[:stop]


def _empty_lse(q: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """The LSE ``(batch, nheads, seqlen_q)`` of rows that see no key: -inf, or the sink's logit."""
    shape = (q.shape[0], q.shape[2], q.shape[1])
    if sinks is None:
        return torch.full(shape, float("-inf"), device=q.device, dtype=torch.float32)
    return sinks.float().reshape(1, -1, 1).expand(shape).clone()


def _dequantised(rows: torch.Tensor, descale: torch.Tensor | None, b: int) -> torch.Tensor:
    """Cache rows ``(n, nheads_k, d)`` as stored, or fp8 ones times sequence ``b``'s descales, in fp32."""
    return rows if descale is None else rows.float() * descale[b].float()[None, :, None]


def _decode_tiled(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi, seqlen_new,
                  softmax_scale, window_left, window_right, softcap, sinks, k_descale=None, v_descale=None):
    """The same attention with the tiled PyTorch path, one sequence at a time (an fp8
    cache dequantised to fp32 first)."""
    batch, seqlen_q, nheads, _ = q.shape
    out = empty_output(q, v_cache.shape[-1]).zero_()
    lse = _empty_lse(q, sinks)
    lengths = (cache_seqlens + seqlen_new).tolist()
    firsts = [0] * batch if leftpad is None else leftpad.tolist()
    for b in range(batch):
        first, stop = firsts[b], lengths[b]
        if stop <= first or seqlen_q == 0:
            continue
        k = _dequantised(cache_rows(k_cache, b, stop, cache_batch_idx, block_table)[first:], k_descale, b)
        v = _dequantised(cache_rows(v_cache, b, stop, cache_batch_idx, block_table)[first:], v_descale, b)
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi).float()[None]
        opts = AttnOptions(softmax_scale, (stop - first) - seqlen_q, window_left, window_right, softcap, slopes,
                           sinks=None if sinks is None else sinks.float())
        o, l = attention_tiled_forward(q[b:b + 1], k[None], v[None], opts)
        out[b], lse[b] = o[0], l[0]
    return out, lse


def _attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                 cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None, leftpad: torch.Tensor | None,
                 alibi: torch.Tensor | None, seqlen_new: int, softmax_scale: float, window_left: int,
                 window_right: int, softcap: float, num_splits: int,
                 sinks: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                 v_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if q.numel() == 0:
        return empty_output(q, v_cache.shape[-1]).zero_(), _empty_lse(q, sinks)
    if q.is_cuda or interpreting():
        return decode_triton(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi,
                             seqlen_new, softmax_scale, window_left, window_right, softcap, num_splits,
                             None if sinks is None else sinks.float(), k_descale, v_descale)
    return _decode_tiled(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi,
                         seqlen_new, softmax_scale, window_left, window_right, softcap, sinks, k_descale, v_descale)


attn_decode_op = torch.library.custom_op("flashtile::attn_decode", mutates_args=())(_attn_decode)


@attn_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi, seqlen_new, softmax_scale,
      window_left, window_right, softcap, num_splits, sinks=None, k_descale=None, v_descale=None):
    return empty_output(q, v_cache.shape[-1]), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def attn_decode(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the cached attention on checked inputs (arguments as ``_attn_decode``):
    the registered op while tracing, a direct call otherwise (decoding steps are
    short enough for the op dispatch to show)."""
    return attn_decode_op(*args) if torch.compiler.is_compiling() else _attn_decode(*args)
