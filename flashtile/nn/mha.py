"""Multi-head attention as a module, with the arguments of flash_attn's ``MHA`` that
matter for current models."""

from __future__ import annotations

import torch

from ..errors import FlashtileValueError
from ..interface.flash_attn import flash_attn_func, flash_attn_varlen_func
from ..interface.kvcache import KVCache
from ..interface.padding import pad_input, unpad_input
from .rotary import RotaryEmbedding


class MultiheadAttention(torch.nn.Module):
    """Multi-head (or grouped-query) attention of ``(batch, seqlen, embed_dim)`` inputs.

    Args:
        embed_dim: the model width.
        num_heads: query heads; the head dim is ``embed_dim // num_heads``.
        num_heads_kv: key/value heads (GQA/MQA); ``num_heads`` if None.
        cross_attn: attend to a second input ``x_kv`` (separate q and kv projections).
        qkv_proj_bias: biases of the input projections.
        out_proj_bias: bias of the output projection.
        dropout: attention dropout while training.
        softmax_scale: the score scale; ``1 / sqrt(head_dim)`` if None.
        causal: causal attention (aligned bottom-right, as flash_attn).
        layer_idx: this layer's index (for the caller's bookkeeping).
        rotary_emb_dim: rotate the first ``rotary_emb_dim`` dims of q and k (0: none;
            self-attention only).
        rotary_emb_base: the rotary frequencies' base.
        rotary_emb_interleaved: rotate neighbouring pairs (GPT-J) instead of halves.
        window_size: ``(left, right)`` sliding window, -1 for unbounded.
        softcap: scores become ``softcap * tanh(scores / softcap)`` if > 0.
        device: where the parameters live.
        dtype: the parameters' dtype.
        context_parallel_group: a ``torch.distributed`` process group over which
            the sequence is sharded (context parallelism): each rank passes its
            shard ``(batch, seqlen_local, embed_dim)``, cut with
            ``flashtile.distributed.shard`` along dim 1, and gets its shard of the
            output; attention runs through
            :func:`flashtile.distributed.ring_flash_attn_func` (or Ulysses).
            Rotary positions are those of the whole sequence. None: no context
            parallelism.
        context_parallel_layout: how the sequence is sharded, ``"zigzag"`` or
            ``"contiguous"``.
        context_parallel_method: ``"ring"`` (any head count) or ``"ulysses"``
            (all-to-all; heads must split over the ranks).

    The self-attention input projection ``Wqkv`` is fused, its output laid out as
    ``[q | k | v]`` (``num_heads``, ``num_heads_kv``, ``num_heads_kv`` heads): with
    ``num_heads_kv == num_heads`` its weight is ``torch.nn.MultiheadAttention``'s
    ``in_proj_weight``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None, cross_attn: bool = False,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, dropout: float = 0.0,
                 softmax_scale: float | None = None, causal: bool = False, layer_idx: int | None = None,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, device=None, dtype=None,
                 context_parallel_group=None, context_parallel_layout: str = "zigzag",
                 context_parallel_method: str = "ring"):
        super().__init__()
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_heads_kv", num_heads_kv)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlashtileValueError(f"flashtile: MultiheadAttention {name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise FlashtileValueError(f"flashtile: MultiheadAttention embed_dim ({embed_dim}) must be a multiple of num_heads "
                             f"({num_heads})")
        if num_heads % num_heads_kv:
            raise FlashtileValueError(f"flashtile: MultiheadAttention num_heads ({num_heads}) must be a multiple of "
                             f"num_heads_kv ({num_heads_kv})")
        if rotary_emb_dim and cross_attn:
            raise NotImplementedError("flashtile: MultiheadAttention with rotary_emb_dim and cross_attn")
        if context_parallel_method not in ("ring", "ulysses"):
            raise FlashtileValueError(f"flashtile: MultiheadAttention context_parallel_method must be 'ring' or "
                                      f"'ulysses', got {context_parallel_method!r}")
        if context_parallel_layout not in ("zigzag", "contiguous"):
            raise FlashtileValueError(f"flashtile: MultiheadAttention context_parallel_layout must be 'zigzag' or "
                                      f"'contiguous', got {context_parallel_layout!r}")
        if context_parallel_group is not None and cross_attn:
            raise NotImplementedError("flashtile: MultiheadAttention with context_parallel_group and cross_attn")
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout, self.context_parallel_method = context_parallel_layout, context_parallel_method
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        self.cross_attn, self.causal, self.layer_idx = cross_attn, causal, layer_idx
        self.dropout, self.softmax_scale = float(dropout), softmax_scale
        self.window_size, self.softcap = tuple(window_size), float(softcap)
        factory = dict(device=device, dtype=dtype)
        kv_dim = 2 * num_heads_kv * self.head_dim
        if cross_attn:
            self.Wq = torch.nn.Linear(embed_dim, num_heads * self.head_dim, bias=qkv_proj_bias, **factory)
            self.Wkv = torch.nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory)
        else:
            self.Wqkv = torch.nn.Linear(embed_dim, num_heads * self.head_dim + kv_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = torch.nn.Linear(num_heads * self.head_dim, embed_dim, bias=out_proj_bias, **factory)
        self.rotary_emb = (RotaryEmbedding(rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved, device=device)
                           if rotary_emb_dim else None)

    def kv_cache(self, batch: int, max_seqlen: int, *, page_size: int | None = None, dtype=None,
                 device=None) -> KVCache:
        """A ``KVCache`` shaped for this layer, for incremental decoding."""
        weight = self.out_proj.weight
        return KVCache(batch, max_seqlen, self.num_heads_kv, self.head_dim, page_size=page_size,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def _project(self, x, x_kv):
        lead = x.shape[:-1]
        if self.cross_attn:
            q = self.Wq(x)
            kv = self.Wkv(x_kv)
            kv_lead = x_kv.shape[:-1]
        else:
            qkv = self.Wqkv(x)
            q, kv = qkv.split([self.num_heads * self.head_dim, 2 * self.num_heads_kv * self.head_dim], dim=-1)
            kv_lead = lead
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k, v = kv.unflatten(-1, (2, self.num_heads_kv, self.head_dim)).unbind(-3)
        return q, k, v, kv_lead

    def forward(self, x: torch.Tensor, x_kv: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Attention of ``x``.

        Args:
            x: ``(batch, seqlen, embed_dim)``, or packed ``(total, embed_dim)`` with
                ``cu_seqlens``.
            x_kv: cross attention's keys/values input ``(batch, seqlen_kv, embed_dim)``.
            key_padding_mask: bool ``(batch, seqlen_kv)``, True for the tokens to
                keep (of ``x``, or of ``x_kv`` with cross attention): the batch runs
                as variable-length attention, no padding computed; the outputs at
                padded positions are the output projection's bias.
            cu_seqlens: int32 ``(batch + 1,)`` offsets of packed sequences (self
                attention).
            max_seqlen: the longest packed sequence.
            kv_cache: decoding: this step's keys/values are appended to the cache
                and ``x`` attends to everything cached (prefill, or new tokens);
                rotary positions start at the cache's lengths.

        Returns:
            (torch.Tensor): shaped like ``x``.
        """
        packed = cu_seqlens is not None
        if packed and (self.cross_attn or key_padding_mask is not None or kv_cache is not None):
            raise FlashtileValueError("flashtile: cu_seqlens is for self attention without key_padding_mask or kv_cache")
        if self.cross_attn and x_kv is None:
            raise FlashtileValueError("flashtile: a cross-attention MultiheadAttention needs x_kv")
        if kv_cache is not None and key_padding_mask is not None:
            raise NotImplementedError("flashtile: MultiheadAttention with kv_cache and key_padding_mask (use "
                                      "KVCache per-sequence lengths)")
        if self.context_parallel_group is not None:
            return self._context_parallel(x, key_padding_mask, cu_seqlens, kv_cache)
        q, k, v, kv_lead = self._project(x, x_kv)
        if self.rotary_emb is not None:
            offset = 0 if kv_cache is None else kv_cache.cache_seqlens
            q, k = self.rotary_emb(q, k, seqlen_offset=offset, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        kw = dict(softmax_scale=self.softmax_scale, causal=self.causal, window_size=self.window_size,
                  softcap=self.softcap)
        dropout = self.dropout if self.training else 0.0
        if kv_cache is not None:
            out = kv_cache.attend(q, k, v, **kw)
        elif packed:
            out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                         dropout_p=dropout, **kw)
        elif key_padding_mask is not None:
            out = self._padded(q, k, v, key_padding_mask, dropout, kw)
        else:
            out = flash_attn_func(q, k, v, dropout_p=dropout, **kw)
        return self.out_proj(out.flatten(-2))

    def _padded(self, q, k, v, key_padding_mask, dropout, kw):
        """A padded batch as variable-length attention over the kept tokens."""
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != k.shape[:2]:
            raise FlashtileValueError(f"flashtile: key_padding_mask must be bool (batch, seqlen_kv) = {tuple(k.shape[:2])}, "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        batch, seqlen_q = q.shape[:2]
        k_p, _, cu_k, max_k, _ = unpad_input(k, key_padding_mask)
        v_p = unpad_input(v, key_padding_mask)[0]
        if self.cross_attn:  # every query kept
            q_p = q.flatten(0, 1)
            cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
            out = flash_attn_varlen_func(q_p, k_p, v_p, cu_q, cu_k, seqlen_q, max_k, dropout_p=dropout, **kw)
            return out.unflatten(0, (batch, seqlen_q))
        q_p, indices, cu_q, max_q, _ = unpad_input(q, key_padding_mask)
        out = flash_attn_varlen_func(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, dropout_p=dropout, **kw)
        return pad_input(out, indices, batch, seqlen_q)

    def _context_parallel(self, x, key_padding_mask, cu_seqlens, kv_cache):
        """Self attention of this rank's shard of a sequence sharded over
        ``context_parallel_group``."""
        from ..distributed import ring_flash_attn_func, ulysses_flash_attn_func
        from ..distributed.layout import shard_chunks

        for name, value in (("key_padding_mask", key_padding_mask), ("cu_seqlens", cu_seqlens),
                            ("kv_cache", kv_cache)):
            if value is not None:
                raise NotImplementedError(f"flashtile: MultiheadAttention with context_parallel_group and {name}")
        if self.training and self.dropout > 0:
            raise NotImplementedError("flashtile: MultiheadAttention with context_parallel_group and dropout > 0 "
                                      "while training")
        if x.dim() != 3:
            raise FlashtileValueError(f"flashtile: with context_parallel_group, x must be this rank's shard "
                                      f"(batch, seqlen_local, embed_dim), got shape {tuple(x.shape)}")
        group, layout = self.context_parallel_group, self.context_parallel_layout
        if layout == "zigzag" and x.shape[1] % 2:
            raise FlashtileValueError(f"flashtile: with the zigzag layout each rank holds two equal chunks; x's "
                                      f"seqlen_local must be even, got {x.shape[1]}")
        q, k, v, _ = self._project(x, None)
        if self.rotary_emb is not None:
            # each chunk of the shard at its place in the whole sequence
            chunks = shard_chunks(layout, torch.distributed.get_rank(group), torch.distributed.get_world_size(group),
                                  x.shape[1])
            rotated = [self.rotary_emb(q[:, c.local_start:c.local_start + c.length],
                                       k[:, c.local_start:c.local_start + c.length], seqlen_offset=c.global_start)
                       for c in chunks]
            q, k = (torch.cat(parts, dim=1) for parts in zip(*rotated))
        attend = ring_flash_attn_func if self.context_parallel_method == "ring" else ulysses_flash_attn_func
        out = attend(q, k, v, group, causal=self.causal, layout=layout, softmax_scale=self.softmax_scale,
                     window_size=self.window_size, softcap=self.softcap)
        return self.out_proj(out.flatten(-2))
