"""FP8 attention's front end: quantising q, k and v to float8_e4m3fn with
per-tensor, per-head or per-block scales, optionally after incoherent
processing (a random Hadamard rotation of q and k, as in FlashAttention-3),
and attention on the result through ``flash_attn_func``'s FP8 forward."""

from .attention import flash_attn_fp8_func
from .hadamard import hadamard_matrix
from .quantize import quantize_qkv

__all__ = ["flash_attn_fp8_func", "hadamard_matrix", "quantize_qkv"]
