"""The rotation of incoherent processing: random signs times a Hadamard transform.

For a head dim ``d`` that is a power of two, ``H`` is the normalised Sylvester
Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, divided
by ``sqrt(d)``). Any other ``d`` (the forward takes 1 to 256) is split by its
binary digits, largest first (``192 = 128 + 64``, ``80 = 64 + 16``, ``59 = 32 +
16 + 8 + 2 + 1``), and ``H`` is block-diagonal with one normalised Sylvester
block per part: orthogonal, with no padding of the head dim, at the price of
mixing channels only within each block.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import FlashtileTypeError, FlashtileValueError


def hadamard_blocks(d: int) -> list[int]:
    """The sizes of the Hadamard blocks of head dim ``d``: its binary digits, largest first."""
    return [1 << i for i in reversed(range(d.bit_length())) if d >> i & 1]


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def rotation_parts(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signed, colscale)`` on the CPU, fp32: ``signed = diag(signs) @ B`` with ``B`` the
    block-diagonal +-1 Hadamard matrix (entries +-1 and 0, exact in any dtype) and
    ``colscale[j] = 1 / sqrt(size of column j's block)``, so that the rotation is
    ``signed * colscale``. Cached: do not modify the tensors."""
    signs = torch.randint(0, 2, (d,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) * 2 - 1
    b = torch.zeros(d, d, dtype=torch.float64)
    colscale = torch.empty(d, dtype=torch.float64)
    start = 0
    for n in hadamard_blocks(d):
        b[start:start + n, start:start + n] = _sylvester(n)
        colscale[start:start + n] = 1.0 / math.sqrt(n)
        start += n
    return (signs[:, None].double() * b).float(), colscale.float()


_on_device: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def rotation_parts_on(d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotation_parts(d, seed)`` on ``device`` (cached per device)."""
    key = (d, seed, torch.device(device))
    parts = _on_device.get(key)
    if parts is None:
        if len(_on_device) > 64:
            _on_device.clear()
        parts = _on_device[key] = tuple(t.to(device) for t in rotation_parts(d, seed))
    return parts


def hadamard_matrix(d: int, seed: int = 0, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rotation ``R`` that ``quantize_qkv(..., incoherent=True, seed=seed)`` applies to q and k.

    ``R = diag(s) @ H``: ``s`` are random signs (+-1) drawn from a CPU
    ``torch.Generator`` seeded with ``seed`` (the same for a given ``d`` and
    ``seed`` on every machine), ``H`` the normalised Sylvester Hadamard matrix
    when ``d`` is a power of two, else block-diagonal with one normalised
    Sylvester block per binary digit of ``d``, largest first (``80 = 64 + 16``).
    ``R`` is orthogonal, so ``(q @ R) @ (k @ R).T == q @ k.T`` and ``x == (x @ R) @ R.T``.

    Args:
        d: head dim, from 1 to 256.
        seed: seed of the random signs.
        device: where to return ``R`` (default the CPU).
        dtype: ``R``'s dtype (computed in fp64, then cast).

    Returns:
        torch.Tensor: ``R``, ``(d, d)``.
    """
    if isinstance(d, bool) or not isinstance(d, int):
        raise FlashtileTypeError(f"flashtile: d must be an int, got {type(d).__name__}")
    if not 1 <= d <= 256:
        raise FlashtileValueError(f"flashtile: d must be between 1 and 256, got {d}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FlashtileTypeError(f"flashtile: seed must be an int, got {type(seed).__name__}")
    signed, _ = rotation_parts(d, seed)
    r = signed.double() * (1.0 / torch.tensor([math.sqrt(n) for n in hadamard_blocks(d) for _ in range(n)],
                                              dtype=torch.float64))
    return r.to(device=device, dtype=dtype)
