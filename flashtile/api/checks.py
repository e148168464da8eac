"""Argument checking shared by the public functions.

Every message names the argument, what was given and what is accepted.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def not_yet(feature: str) -> NotImplementedError:
    return NotImplementedError(f"flashtile: {feature} is not supported yet")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flashtile: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_device(t: torch.Tensor) -> None:
    device = t.device
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise NotImplementedError(
            f"flashtile: tensors on device '{device}' are not supported; use CUDA/ROCm GPUs or the CPU")
    if torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise NotImplementedError(
                f"flashtile: GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                "the Triton kernels need 8.0 (Ampere) or newer")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Check q, k, v given in flash_attn layout ``(batch, seqlen, nheads, headdim)``.

    ``layout`` is the shape as the caller's API spells it, used in messages.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flashtile: {name} has dtype {t.dtype}; supported are float16, bfloat16 and float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flashtile: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flashtile: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flashtile: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    (bq, _, hq, dq), (bk, sk, hk, dk), (bv, sv, hv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise ValueError(f"flashtile: q, k, v must share the batch size, got {bq}, {bk}, {bv}")
    if sk != sv:
        raise ValueError(f"flashtile: k and v must have the same sequence length, got {sk} and {sv}")
    if hk != hv:
        raise ValueError(f"flashtile: k and v must have the same number of heads, got {hk} and {hv}")
    if hq == 0 or hk == 0:
        raise ValueError(f"flashtile: the number of heads must be positive, got q: {hq}, k/v: {hk}")
    if hq % hk != 0:
        raise ValueError(
            f"flashtile: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hk})")
    if dq != dk:
        raise ValueError(f"flashtile: q and k must have the same head dim, got {dq} and {dk}")
    if dv != dq:
        raise NotImplementedError(f"flashtile: a value head dim ({dv}) different from the query/key head dim ({dq}) "
                                  "is not supported yet")
    if not 1 <= dq <= MAX_HEAD_DIM:
        raise ValueError(f"flashtile: head dim must be between 1 and {MAX_HEAD_DIM}, got {dq}")
    check_device(q)


def check_scale(name: str, scale, head_dim: int) -> float:
    """Validate a softmax scale; None means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"flashtile: {name} must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"flashtile: {name} must be finite, got {scale}")
    return float(scale)


def check_dropout(name: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"flashtile: {name} must be a float in [0, 1), got {p!r}")
    if p > 0.0:
        raise not_yet(f"dropout ({name}={p})")
