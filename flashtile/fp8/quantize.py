"""``quantize_qkv``: q, k and v in flash_attn layout to float8_e4m3fn with their
descales, optionally after incoherent processing (a random Hadamard rotation of
q and k). GPU tensors (and CPU tensors under Triton's interpreter) run one
Triton kernel that fuses the rotation into the quantisation; other CPU tensors
run the same arithmetic in PyTorch."""

from __future__ import annotations

import torch

from ..backends.torch_quantize import quantize_torch
from ..backends.triton.launch.device import interpreting
from ..errors import FlashtileTypeError, FlashtileValueError
from ..interface.checks import check_qkv
from .hadamard import rotation_parts_on

SCALINGS = ("tensor", "head", "block")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def _quantize(x: torch.Tensor, nheads_k: int, rotation, colscale, scaling: str):
    if _use_triton(x):
        from ..backends.triton.launch.quantize import quantize_triton

        return quantize_triton(x, nheads_k, rotation, colscale, scaling)
    return quantize_torch(x, nheads_k, rotation, colscale, scaling)


def check_fp8_options(scaling, incoherent, seed) -> None:
    if scaling not in SCALINGS:
        raise FlashtileValueError(f"flashtile: scaling must be one of 'tensor', 'head', 'block', got {scaling!r}")
    if not isinstance(incoherent, bool):
        raise FlashtileTypeError(f"flashtile: incoherent must be a bool, got {type(incoherent).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FlashtileTypeError(f"flashtile: seed must be an int, got {type(seed).__name__}")


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: str = "block", incoherent: bool = True,
                 seed: int = 0):
    """Quantise q, k and v (flash_attn layout) to float8_e4m3fn for FP8 attention.

    Each value is divided by its scale block's descale, rounded to nearest
    (ties to even) and saturated at +-448, so that ``real value ≈ fp8 value *
    descale``; a descale is ``amax / 448`` over its block (1 for an all-zero
    block: always finite and positive). With ``incoherent=True``, q and k are
    first multiplied by the same orthogonal matrix ``R =
    hadamard_matrix(headdim, seed)`` (FlashAttention-3's incoherent processing:
    outlier channels are spread over the head dim, so block maxima shrink and
    the small values keep more precision); since ``R Rᵀ = I``, ``(q R)(k R)ᵀ =
    q kᵀ`` and attention is unchanged. v is never rotated. The dequantised q is
    ``(q8.float() * q_descale) @ R.T``.

    Scale blocks, by ``scaling``:

    * ``"tensor"``: one scale per tensor, returned repeated as ``(batch, nheads_k)``;
    * ``"head"``: one per (batch, kv head): ``(batch, nheads_k)``; the query heads of
      one GQA group share their kv head's scale (the max over the group);
    * ``"block"``: one per 128 (``FP8_SCALE_BLOCK``) consecutive positions of a
      (batch, kv head), all query heads of the group together: q_descale
      ``(batch, nheads_k, cdiv(seqlen_q, 128))``, k_descale ``(batch, nheads_k,
      cdiv(seqlen_k, 128))``. v_descale stays ``(batch, nheads_k)`` (one per head).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16, bf16 or fp32.
        k: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype and device,
            ``nheads % nheads_k == 0``; headdim from 1 to 256.
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``, like ``k``.
        scaling: ``"tensor"``, ``"head"`` or ``"block"``.
        incoherent: rotate q and k by ``hadamard_matrix(headdim, seed)`` first.
        seed: seed of the rotation's random signs.

    Returns:
        tuple: ``(q8, k8, v8, q_descale, k_descale, v_descale)``: float8_e4m3fn
            tensors of q's, k's and v's shapes (contiguous), and fp32 descales
            shaped as above, on the inputs' device.
    """
    check_qkv(q, k, v, "(batch, seqlen, nheads, headdim)")
    check_fp8_options(scaling, incoherent, seed)
    nheads_k = k.shape[2]
    rotation = colscale = None
    if incoherent:
        rotation, colscale = rotation_parts_on(q.shape[-1], seed, q.device)
    q8, q_descale = _quantize(q, nheads_k, rotation, colscale, scaling)
    k8, k_descale = _quantize(k, nheads_k, rotation, colscale, scaling)
    v8, v_descale = _quantize(v, nheads_k, None, None, "head" if scaling == "block" else scaling)
    return q8, k8, v8, q_descale, k_descale, v_descale
