"""FP8 attention, forward only: ``flashtile::attn_fwd_fp8``.

q, k and v arrive in float8_e4m3fn with fp32 descales (real value = stored value
x descale, FlashAttention-3's convention): ``(batch, nheads_k)``, and for q and
k optionally a third dimension of one scale per ``FP8_SCALE_BLOCK`` rows of a
sequence (block quantisation). The Triton kernel multiplies the FP8 products
by the descales and rounds P to e4m3 for its product with V; the tiled PyTorch
path dequantises q, k and v and rounds P the same way, so the CPU runs the same
arithmetic. The output has its own dtype (``out_dtype``).

There is no backward pass: gradients through FP8 inputs raise
``NotImplementedError``.
"""

from __future__ import annotations

import os

import torch

from ..backends.torch_tiled import attention_tiled_forward
from ..backends.triton.launch import attention as launch
from ..options import FP8_SCALE_BLOCK, empty_output
from .attention import _empty_lse, _sequence_kv, _use_triton, attn_options, seq_options, varlen_slices


def dequantize(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """fp32 values of an FP8 tensor ``x`` ``(batch, seqlen, nheads, d)`` with descales
    ``(batch, nheads_k)`` or ``(batch, nheads_k, n_blocks)`` (``nheads`` a multiple of
    ``nheads_k``: the heads of a group share their scale; block ``i`` holds rows
    ``[i * FP8_SCALE_BLOCK, (i + 1) * FP8_SCALE_BLOCK)``)."""
    group = x.shape[2] // descale.shape[1]
    if descale.dim() == 2:
        scale = descale[:, None, :, None]
    else:
        rows = torch.arange(x.shape[1], device=x.device) // FP8_SCALE_BLOCK
        scale = descale[:, :, rows].transpose(1, 2)[..., None]
    return x.float() * scale.float().repeat_interleave(group, dim=2)


def sequence_major(v: torch.Tensor) -> torch.Tensor:
    """``v`` ``(batch, seqlen, nheads_k, d)`` (or ``(total, nheads_k, d)``) with the sequence
    dimension contiguous (a copy unless it is already): on Hopper the FP8 product P V takes
    V that way (its reduction dimension innermost), as FlashAttention-3 transposes V too."""
    seq = v.dim() - 3
    if v.stride(seq) == 1 and v.shape[seq] > 1:
        return v
    order = [i for i in range(v.dim()) if i != seq] + [seq]  # (..., nheads_k, d, seqlen)
    return v.permute(order).contiguous().permute([order.index(i) for i in range(v.dim())])


def _attn_fwd_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor,
                  k_descale: torch.Tensor, v_descale: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                  cu_seqlens_k: torch.Tensor | None, alibi: torch.Tensor | None, max_seqlen_q: int,
                  max_seqlen_k: int, softmax_scale: float, diag: int, window_left: int, window_right: int,
                  softcap: float, sinks: torch.Tensor | None, seqused_k: torch.Tensor | None,
                  block_table: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    varlen = cu_seqlens_q is not None
    opts = attn_options(q, k, None, alibi, None, softmax_scale, diag, window_left, window_right, softcap, 0.0,
                        varlen, None, sinks)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    if q.numel() == 0 or k.shape[-3] == 0:
        return empty_output(q, v.shape[-1], out_dtype).zero_(), _empty_lse(lse_shape, opts.sinks, varlen, q.device)
    if _use_triton(q):
        return launch.attention_forward(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        seqused_k=seqused_k, block_table=block_table,
                                        fp8=(q_descale, k_descale, v_descale, out_dtype))
    if not varlen:
        return attention_tiled_forward(dequantize(q, q_descale), dequantize(k, k_descale),
                                       dequantize(v, v_descale), opts, fp8_probs=True, out_dtype=out_dtype)
    out = empty_output(q, v.shape[-1], out_dtype).zero_()
    lse = _empty_lse(lse_shape, opts.sinks, varlen, q.device)
    for i, sq, sk in varlen_slices(cu_seqlens_q, cu_seqlens_k, seqused_k):
        k_i, v_i = _sequence_kv(k, v, i, sk, block_table)
        o, lse_i = attention_tiled_forward(
            dequantize(q[None, sq], q_descale[i:i + 1]), dequantize(k_i, k_descale[i:i + 1]),
            dequantize(v_i, v_descale[i:i + 1]),
            seq_options(opts, i, sq.stop - sq.start, sk.stop - sk.start, max_seqlen_q, max_seqlen_k),
            fp8_probs=True, out_dtype=out_dtype)
        out[sq], lse[:, sq] = o[0], lse_i[0]
    return out, lse


attn_fwd_fp8 = torch.library.custom_op("flashtile::attn_fwd_fp8", mutates_args=())(_attn_fwd_fp8)


@attn_fwd_fp8.register_fake
def _(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, alibi, max_seqlen_q, max_seqlen_k,
      softmax_scale, diag, window_left, window_right, softcap, sinks, seqused_k, block_table, out_dtype):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    return empty_output(q, v.shape[-1], out_dtype), q.new_empty(lse_shape, dtype=torch.float32)


def _no_backward(ctx, dout, dlse):
    raise NotImplementedError("flashtile: the backward pass of FP8 attention (float8_e4m3fn q, k, v) is not "
                              "supported; train with fp16/bf16 inputs")


attn_fwd_fp8.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor,
                  k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float, diag: int, *,
                  window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: torch.Tensor | None = None,
                  sinks: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                  seqused_k: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention on checked inputs (see the module docstring). Returns (out, lse),
    out in ``out_dtype``. The other arguments are those of ``ops.attention.attention``."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    # FLASHTILE_FP8_V=row keeps V as given (experiments: the cost of the other layout)
    if _use_triton(q) and block_table is None and os.environ.get("FLASHTILE_FP8_V") != "row":
        v = sequence_major(v)
    elif v.stride(-1) != 1:
        v = v.contiguous()
    q_descale, k_descale, v_descale = (d.float().contiguous() for d in (q_descale, k_descale, v_descale))
    return attn_fwd_fp8(q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, alibi, max_seqlen_q,
                        max_seqlen_k, softmax_scale, diag, window[0], window[1], softcap, sinks, seqused_k,
                        block_table, out_dtype)
