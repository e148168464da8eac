"""Argument checking shared by the public functions.

Every message names the argument, what was given and what is accepted.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import FlashtileTypeError, FlashtileValueError
from ..options import FP8_SCALE_BLOCK

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def not_yet(feature: str) -> NotImplementedError:
    return NotImplementedError(f"flashtile: {feature} is not supported yet")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise FlashtileTypeError(f"flashtile: {name} must be a torch.Tensor, got {type(t).__name__}")


@functools.lru_cache(maxsize=None)
def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)  # asked on every call: cached


def check_device(t: torch.Tensor) -> None:
    device = t.device
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise NotImplementedError(
            f"flashtile: tensors on device '{device}' are not supported; use CUDA/ROCm GPUs or the CPU")
    if torch.version.hip is None:
        major, minor = _device_capability(device)
        if major < 8:
            raise NotImplementedError(
                f"flashtile: GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
                "the Triton kernels need 8.0 (Ampere) or newer")


FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                    "float8_e5m2fnuz") if hasattr(torch, name))


def is_fp8_call(q, k, v, descales: dict, out_dtype) -> bool:
    """Whether q, k, v are FP8 (float8_e4m3fn, all three); FP8 arguments (``descales``:
    name -> tensor or None, ``out_dtype``) given with other inputs are an error."""
    fp8 = [isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in (q, k, v)]
    if any(fp8):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dtype != torch.float8_e4m3fn:
                kind = ("only float8_e4m3fn is supported among FP8 formats" if t.dtype in FP8_DTYPES
                        else "q, k and v must all be float8_e4m3fn when one is")
                raise FlashtileTypeError(f"flashtile: {name} has dtype {t.dtype}; {kind}")
        return True
    given = [name for name, t in descales.items() if t is not None] + (["out_dtype"] if out_dtype is not None else [])
    if given:
        raise FlashtileValueError(f"flashtile: {', '.join(given)} apply to float8_e4m3fn q, k, v only; got "
                                  f"{getattr(q, 'dtype', type(q).__name__)} inputs")
    return False


def check_descale(name: str, t: torch.Tensor, shapes: list[tuple[int, ...]], device, what: str = "") -> None:
    """An FP8 descale: an fp32 tensor of one of ``shapes`` on ``device`` (``what`` says
    what the dimensions are, in messages)."""
    check_tensor(name, t)
    if t.dtype != torch.float32:
        raise FlashtileTypeError(f"flashtile: {name} must be float32, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        accepted = " or ".join(str(s) for s in shapes)
        raise FlashtileValueError(f"flashtile: {name} must have shape {accepted}{what}, got {tuple(t.shape)}")
    if t.device != device:
        raise FlashtileValueError(f"flashtile: {name} is on {t.device}, the inputs on {device}")


def check_fp8_descales(q_descale, k_descale, v_descale, out_dtype, batch: int, nheads_k: int, seqlen_q: int,
                       seqlen_k: int, device) -> torch.dtype:
    """The descales of FP8 inputs: fp32 ``(batch, nheads_k)``, q's and k's optionally with one
    scale per FP8_SCALE_BLOCK rows, ``(batch, nheads_k, cdiv(seqlen, FP8_SCALE_BLOCK))``.
    Returns the output dtype (bf16 unless ``out_dtype``)."""
    for name, t, seqlen in (("q_descale", q_descale, seqlen_q), ("k_descale", k_descale, seqlen_k),
                            ("v_descale", v_descale, None)):
        if t is None:
            raise FlashtileValueError(f"flashtile: float8_e4m3fn inputs need q_descale, k_descale and v_descale "
                                      f"(fp32, (batch, nheads_k) = ({batch}, {nheads_k})); {name} is missing")
        shapes = [(batch, nheads_k)]
        what = " (batch, nheads_k)"
        if seqlen is not None:
            shapes.append((batch, nheads_k, -(-seqlen // FP8_SCALE_BLOCK)))
            what = f" (batch, nheads_k[, blocks of {FP8_SCALE_BLOCK} rows])"
        check_descale(name, t, shapes, device, what)
    if out_dtype is None:
        return torch.bfloat16
    if out_dtype not in SUPPORTED_DTYPES:
        raise FlashtileTypeError(f"flashtile: out_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                                 f"got {out_dtype!r}")
    return out_dtype


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, fp8: bool = False) -> None:
    """Check q, k, v given in flash_attn layout ``(batch, seqlen, nheads, headdim)``.

    ``layout`` is the shape as the caller's API spells it, used in messages. ``fp8``:
    float8_e4m3fn inputs (see ``is_fp8_call``) instead of fp16, bf16 or fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES and not fp8:
            raise FlashtileTypeError(f"flashtile: {name} has dtype {t.dtype}; supported are float16, bfloat16 and "
                                     "float32 (and float8_e4m3fn with descales)")
    if not (q.dtype == k.dtype == v.dtype):
        raise FlashtileTypeError(f"flashtile: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise FlashtileValueError(f"flashtile: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise FlashtileValueError(f"flashtile: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    (bq, _, hq, dq), (bk, sk, hk, dk), (bv, sv, hv, dv) = q.shape, k.shape, v.shape
    if not (bq == bk == bv):
        raise FlashtileValueError(f"flashtile: q, k, v must share the batch size, got {bq}, {bk}, {bv}")
    if sk != sv:
        raise FlashtileValueError(f"flashtile: k and v must have the same sequence length, got {sk} and {sv}")
    if hk != hv:
        raise FlashtileValueError(f"flashtile: k and v must have the same number of heads, got {hk} and {hv}")
    if hq == 0 or hk == 0:
        raise FlashtileValueError(f"flashtile: the number of heads must be positive, got q: {hq}, k/v: {hk}")
    if hq % hk != 0:
        raise FlashtileValueError(
            f"flashtile: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hk})")
    if dq != dk:
        raise FlashtileValueError(f"flashtile: q and k must have the same head dim, got {dq} and {dk}")
    if not 1 <= dq <= MAX_HEAD_DIM:
        raise FlashtileValueError(f"flashtile: head dim must be between 1 and {MAX_HEAD_DIM}, got {dq}")
    if not 1 <= dv <= MAX_HEAD_DIM:
        raise FlashtileValueError(f"flashtile: v's head dim must be between 1 and {MAX_HEAD_DIM}, got {dv}")
    check_device(q)


def check_scale(name: str, scale, head_dim: int) -> float:
    """Validate a softmax scale; None means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise FlashtileTypeError(f"flashtile: {name} must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise FlashtileValueError(f"flashtile: {name} must be finite, got {scale}")
    return float(scale)


def check_dropout(name: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise FlashtileValueError(f"flashtile: {name} must be a float in [0, 1), got {p!r}")


def check_softcap(softcap) -> None:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0.0 <= softcap < math.inf):
        raise FlashtileValueError(f"flashtile: softcap must be a float >= 0 (0 = off), got {softcap!r}")


def check_alibi(alibi_slopes, batch: int, nheads: int, device: torch.device) -> None:
    """ALiBi slopes: fp32 ``(nheads,)`` or ``(batch, nheads)`` on the inputs' device."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise FlashtileTypeError(f"flashtile: alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise FlashtileValueError(f"flashtile: alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise FlashtileValueError(f"flashtile: alibi_slopes is on {alibi_slopes.device}, the inputs on {device}")
    if alibi_slopes.stride(-1) != 1:
        raise FlashtileValueError("flashtile: alibi_slopes must be contiguous along the heads")


def check_sinks(sinks, nheads: int, q: torch.Tensor) -> None:
    """Attention sinks: one logit per query head, ``(nheads,)``, fp32 or q's dtype, on q's device."""
    if sinks is None:
        return
    check_tensor("sinks", sinks)
    if sinks.dtype not in (torch.float32, q.dtype):
        raise FlashtileTypeError(f"flashtile: sinks must be float32 or the inputs' dtype {q.dtype}, got {sinks.dtype}")
    if tuple(sinks.shape) != (nheads,):
        raise FlashtileValueError(f"flashtile: sinks must have shape ({nheads},) (one logit per query head), "
                                  f"got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise FlashtileValueError(f"flashtile: sinks is on {sinks.device}, the inputs on {q.device}")


def check_varlen_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False) -> None:
    """q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)``: checked as a batch of one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise FlashtileValueError(f"flashtile: {name} must be 3-D (total, nheads, headdim) for variable-length "
                             f"attention, got shape {tuple(t.shape)}")
    check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), "(total, nheads, headdim)", fp8)


def _check_cu(name: str, cu, total: int | None, max_seqlen, max_name: str, device) -> int:
    """Check an offsets tensor; ``total`` None: its last value is not checked (offsets that
    only give lengths, as ``cu_seqlens_k`` does for paged keys)."""
    check_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise FlashtileTypeError(f"flashtile: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise FlashtileValueError(f"flashtile: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise FlashtileValueError(f"flashtile: {name} is on {cu.device}, the inputs on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise FlashtileValueError(f"flashtile: {max_name} must be an int >= 0 (or a 0-d integer tensor), got {max_seqlen!r}")
    capturing = cu.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing:
        # values checked on the host (a small copy): wrong offsets would read out of bounds. Not
        # while a CUDA graph is captured, which allows no copy to the host (nor would it see
        # the values of later replays)
        values = cu.tolist()
        lengths = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0 or (total is not None and values[-1] != total) or any(n < 0 for n in lengths):
            raise FlashtileValueError(f"flashtile: {name} must start at 0, never decrease and end at the total length "
                             f"{total}, got {values[:8]}{'...' if len(values) > 8 else ''}")
        if lengths and max(lengths) > max_seqlen:
            raise FlashtileValueError(f"flashtile: {max_name}={max_seqlen} is smaller than the longest sequence "
                             f"({max(lengths)}) in {name}")
    return cu.numel() - 1


def as_max_seqlen(value):
    """A ``max_seqlen`` argument as a Python int: 0-d integer tensors are read (as
    flash_attn's bindings and transformers' packed-sequence path pass them); anything
    else is returned as it is, for the check to name."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    return value


def check_cu_seqlens(cu_q, cu_k, max_seqlen_q, max_seqlen_k, q: torch.Tensor, k: torch.Tensor,
                     paged: bool = False, seqused: bool = False) -> int:
    """Check the varlen offsets; returns the batch size. ``paged``: k is paged, cu_k gives
    only lengths; ``seqused``: seqused_k gives the lengths, checked against max_seqlen_k there."""
    batch = _check_cu("cu_seqlens_q", cu_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    batch_k = _check_cu("cu_seqlens_k", cu_k, None if paged else k.shape[0],
                        1 << 62 if seqused else max_seqlen_k, "max_seqlen_k", q.device)
    if batch != batch_k:
        raise FlashtileValueError(f"flashtile: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{batch + 1} and {batch_k + 1}")
    return batch


def check_attn_mask(attn_mask, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """SDPA's attn_mask: bool (True = attend) or float (added), broadcastable to
    ``(batch, nheads, seqlen_q, seqlen_k)``; returned as a 4-D view."""
    check_tensor("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise FlashtileTypeError(f"flashtile: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise FlashtileValueError(f"flashtile: attn_mask is on {attn_mask.device}, the inputs on {device}")
    target = (batch, nheads, seqlen_q, seqlen_k)
    if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
        raise FlashtileValueError(f"flashtile: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(batch, nheads, seqlen_q, seqlen_k) = {target}")
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
