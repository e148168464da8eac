"""The kernels' dropout generator in PyTorch: Philox-4x32-10 on each score's linear
index, as Triton's ``tl.rand``, bit for bit. The tiled path draws its dropout
with it; tests regenerate the kernels' keep-masks with it."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values
    ``b`` held in int64 (split in 16-bit halves so nothing overflows)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo
    t = a * b_hi + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def _philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` for int64 ``offsets``: float32 uniforms in [0, 1)."""
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(0xCD9E8D57, c2)
        hi_a, lo_a = _mul32(0xD2511F53, c0)
        c0, c2 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1
        c1, c3 = lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep_mask(seed: int, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      rows_per_head: int, cols_per_row: int, dropout_p: float) -> torch.Tensor:
    """Keep-mask (True = kept) of the kernels' dropout for broadcastable int64 index
    tensors ``bh = batch * nheads + head``, ``rows`` (query) and ``cols`` (key)."""
    offsets = (bh * rows_per_head + rows) * cols_per_row + cols
    return _philox_uniform(seed, offsets) >= torch.tensor(dropout_p, dtype=torch.float32)

