"""Launch the Triton kernels: output allocation, grids, strides, configs.

Tensors arrive in flash_attn layout ``(batch, seqlen, nheads, headdim)`` with
a contiguous last dimension; any other strides are passed to the kernels.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from ..kernels.backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ..kernels.configs import LaunchConfig, launch_configs
from ..kernels.forward import attn_fwd_kernel

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _capability(device: torch.device) -> tuple[int, int] | None:
    if interpreting() or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow PyTorch's own matmul setting: exact fp32 unless TF32 is allowed
    if dtype == torch.float32 and torch.version.hip is None and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


_chosen: dict[tuple, LaunchConfig] = {}
# kernel name -> config forced by tuning scripts (see benchmarks/tune.py)
forced_configs: dict[str, LaunchConfig] = {}


def _launch(name: str, kernel, grid_fn, args: tuple, constexprs: dict, tensor: torch.Tensor, block_d: int):
    """Launch ``kernel`` with the first config of the table that compiles here."""
    capability = _capability(tensor.device)
    key = (name, block_d, tensor.dtype, capability, tuple(sorted(constexprs.items())))
    if name in forced_configs:
        candidates = [forced_configs[name]]
    elif key in _chosen:
        candidates = [_chosen[key]]
    else:
        candidates = launch_configs(name, block_d, tensor.element_size(), capability)
    error = None
    for cfg in candidates:
        try:
            kernel[grid_fn(cfg)](*args, **constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        except triton.runtime.errors.OutOfResources as exc:  # too large for this GPU: next one
            error = exc
            continue
        if name not in forced_configs:
            _chosen[key] = cfg
        return
    raise RuntimeError(f"flashtile: no launch configuration of kernel '{name}' fits this GPU") from error


def _common_constexprs(q: torch.Tensor, causal: bool) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1], BLOCK_D=_block_d(q.shape[-1]), IS_CAUSAL=causal,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(q.dtype),
    )


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value == "1"


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


_allocator_set = False


def _forward_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """USE_TMA / WARP_SPECIALIZE for the forward kernel. Defaults per architecture;
    FLASHTILE_FWD_TMA / FLASHTILE_FWD_WS = 0 or 1 override them (for experiments)."""
    global _allocator_set
    capability = _capability(q.device)
    hopper = capability is not None and capability[0] >= 9
    use_tma = _env_flag("FLASHTILE_FWD_TMA")
    use_tma = hopper and DEFAULT_FWD_TMA if use_tma is None else use_tma
    use_tma = use_tma and _tma_compatible(k, v)
    warp_spec = _env_flag("FLASHTILE_FWD_WS")
    warp_spec = hopper and DEFAULT_FWD_WS if warp_spec is None else warp_spec and capability is not None
    if use_tma and q.is_cuda and not _allocator_set:
        # device-side descriptors live in a small global scratch buffer
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=q.device))
        _allocator_set = True
    return dict(USE_TMA=bool(use_tma), WARP_SPECIALIZE=bool(warp_spec))


# measured on an H100: tensor descriptors pay (+16% at d=128), warp specialisation does not
DEFAULT_FWD_TMA = True
DEFAULT_FWD_WS = False


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (batch, seqlen, heads, dim) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def attention_forward(q, k, v, softmax_scale: float, causal: bool, causal_offset: int):
    """Returns (out, lse): out like q, lse (batch, nheads, seqlen_q) fp32."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    const = _common_constexprs(q, causal) | _forward_features(q, k, v)
    args = (q, k, v, out, lse, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(out), lse.stride(0), lse.stride(1),
            nheads, nheads // nheads_k, seqlen_q, seqlen_k, causal_offset, softmax_scale * LOG2E)
    _launch("fwd_tma" if const["USE_TMA"] else "fwd", attn_fwd_kernel, lambda c: (triton.cdiv(seqlen_q, c.block_m) * batch * nheads,),
            args, const, q, const["BLOCK_D"])
    return out, lse


def attention_backward(dout, q, k, v, out, lse, softmax_scale: float, causal: bool, causal_offset: int):
    """Returns (dq, dk, dv) shaped and typed like (q, k, v)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    const = _common_constexprs(q, causal)
    block_d = const["BLOCK_D"]

    delta = torch.empty_like(lse)
    pre_m = 32 if interpreting() else 64
    attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, pre_m) * batch * nheads,)](
        out, dout, delta, *_bsh(out), *_bsh(dout), delta.stride(0), delta.stride(1), nheads, seqlen_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qk_scale = softmax_scale * LOG2E
    args = (q, k, v, dout, dk, dv, lse, delta, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout), *_bsh(dk), *_bsh(dv),
            lse.stride(0), lse.stride(1), nheads_k, group, seqlen_q, seqlen_k, causal_offset, softmax_scale, qk_scale)
    _launch("dkdv", attn_bwd_dkdv_kernel, lambda c: (triton.cdiv(seqlen_k, c.block_n) * batch * nheads_k,),
            args, const, q, block_d)
    args = (q, k, v, dout, dq, lse, delta, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(dout), *_bsh(dq),
            lse.stride(0), lse.stride(1), nheads, group, seqlen_q, seqlen_k, causal_offset, softmax_scale, qk_scale)
    _launch("dq", attn_bwd_dq_kernel, lambda c: (triton.cdiv(seqlen_q, c.block_m) * batch * nheads,),
            args, const, q, block_d)
    return dq, dk, dv


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
