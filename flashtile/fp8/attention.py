"""``flash_attn_fp8_func``: quantise q, k, v (``quantize_qkv``) and run the FP8
forward of ``flash_attn_func`` on them."""

from __future__ import annotations

import torch

from ..interface.checks import check_scale
from ..interface.flash_attn import flash_attn_func
from .quantize import quantize_qkv


def flash_attn_fp8_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                        causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                        scaling: str = "block", incoherent: bool = True, seed: int = 0,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention with FP8 (float8_e4m3fn) q, k and v, from 16- or 32-bit inputs; forward only.

    ``quantize_qkv(q, k, v, scaling, incoherent, seed)`` followed by
    ``flash_attn_func(q8, k8, v8, ..., q_descale=, k_descale=, v_descale=,
    out_dtype=)``. The incoherent rotation leaves ``q kᵀ`` unchanged, so the
    result approximates ``flash_attn_func(q, k, v, ...)``.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32.
        k: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype and device,
            ``nheads % nheads_k == 0``; headdim from 1 to 256.
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``, like ``k``.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        causal: causal mask aligned to the bottom-right corner, as ``flash_attn_func``.
        window_size: ``(left, right)`` sliding window, -1 for unbounded.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        scaling: ``"tensor"``, ``"head"`` or ``"block"`` (see ``quantize_qkv``).
        incoherent: rotate q and k by a random Hadamard matrix before quantising.
        seed: seed of the rotation's random signs.
        out_dtype: the output's dtype; defaults to q's.

    Returns:
        torch.Tensor: ``(batch, seqlen_q, nheads, headdim_v)`` in ``out_dtype``.
    """
    if isinstance(q, torch.Tensor):
        softmax_scale = check_scale("softmax_scale", softmax_scale, q.shape[-1])
    q8, k8, v8, q_descale, k_descale, v_descale = quantize_qkv(q, k, v, scaling=scaling, incoherent=incoherent,
                                                               seed=seed)
    return flash_attn_func(q8, k8, v8, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                           softcap=softcap, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                           out_dtype=out_dtype or q.dtype)
