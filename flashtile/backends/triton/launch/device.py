"""Facts of the device a launch runs on (compute capability, multiprocessors,
Triton's interpreter), the dot-product precision of fp32 inputs, and the
host-side helpers every launcher shares."""

from __future__ import annotations

import functools
import os

import torch

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_capabilities: dict[int, tuple[int, int]] = {}
# every device reports this capability when set: for tools that compile for a GPU this
# machine does not have (benchmarks/tools/sm90_compile.py) and tests of per-GPU choices
ASSUMED_CAPABILITY: tuple[int, int] | None = None


def capability_of(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device`` (cached per device: asked on every call), or
    None under the interpreter and off CUDA."""
    if ASSUMED_CAPABILITY is not None:
        return ASSUMED_CAPABILITY
    if device.type != "cuda" or interpreting():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _capabilities.get(index)
    if capability is None:
        capability = _capabilities[index] = torch.cuda.get_device_capability(index)
    return capability


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# A causal grid's programs carry work growing (forward, dQ) or shrinking (dK/dV) with
# the block index. Issued head after head, the grid would end on the last heads'
# heaviest blocks running alone: its last LONGEST_FIRST_WAVES x SMs programs are issued
# block by block across heads instead, heaviest first (kernels/tiles.py, program_tile).
# Once a head has more blocks than half the multiprocessors, its own lighter blocks fill
# in behind its heavy ones, and the order across heads costs more L2 reuse than it gains
# (docs/experiments/2026-12-01-halves-schedule.md, the end of a causal grid).
LONGEST_FIRST_WAVES = 6
# under the interpreter: multiprocessors to assume, so that small test grids take both orders
INTERPRETER_SMS = 8


def tail_heads(num_blocks: int, num_bh: int, uneven: bool, device: torch.device) -> int:
    """``tail_bh`` of a grid of ``num_blocks`` sequence blocks x ``num_bh`` (batch, head)
    pairs: 0 unless the work per block is ``uneven`` and a head's blocks fill at most
    half the GPU."""
    if not uneven:
        return 0
    sms = sm_count(device) if device.type == "cuda" else INTERPRETER_SMS
    if num_blocks > sms // 2:
        return 0
    return min(num_bh, cdiv(LONGEST_FIRST_WAVES * sms, num_blocks))


def cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv is a constexpr function, several times slower to call on the host
    return -(-a // b)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """Precision of the kernels' dot products for ``dtype`` inputs. fp32 follows
    PyTorch's matmul setting: TF32 when ``torch.backends.cuda.matmul.allow_tf32``,
    else products accurate to about fp32 (relative error ~1e-6): three TF32
    products per element (the operands split into a TF32 high and low part) on
    tensor-core NVIDIA GPUs, plain fp32 elsewhere. ``FLASHTILE_FP32_DOT``
    (``ieee``, ``tf32x3`` or ``tf32``) overrides the choice."""
    if dtype != torch.float32:
        return "ieee"
    forced = os.environ.get("FLASHTILE_FP32_DOT")
    if forced:
        if forced not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"FLASHTILE_FP32_DOT must be 'ieee', 'tf32x3' or 'tf32', got {forced!r}")
        return forced
    capability = capability_of(device)
    if torch.version.hip is not None or capability is None or capability[0] < 8:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def next_power_of_2(n: int) -> int:
    # plain Python, like cdiv (triton.next_power_of_2 is a constexpr function)
    return 1 << max(0, n - 1).bit_length()


def block_d_of(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))



def env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value == "1"


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def scratch_allocator(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")

