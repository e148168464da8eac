"""The kernels' fp32 -> float8_e4m3fn cast (``kernels.fp8.to_e4m3``) against PyTorch's
cast, which rounds to nearest even: every e4m3 value, every midpoint between two
(the ties), random values over the whole range, and saturation at +-448."""

import pytest
import torch
import triton
import triton.language as tl

from flashtile.backends.triton.kernels.fp8 import to_e4m3
from flashtile.backends.triton.launch.device import interpreting


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr, EXACT: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, to_e4m3(tl.load(x_ptr + offs), EXACT))


def _values(device):
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].sort().values
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([grid, (grid[1:] + grid[:-1]) / 2,
                   torch.randn(4096, generator=gen) * 30, torch.randn(2048, generator=gen) * 1e-2,
                   torch.randn(1024, generator=gen) * 1e-3,
                   torch.tensor([449.0, 464.0, 465.0, 1e4, -1e30, 2.0**-10, 3 * 2.0**-11])])
    return torch.nn.functional.pad(x, (0, triton.next_power_of_2(x.numel()) - x.numel())).to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_to_e4m3_rounds_to_nearest_even_and_saturates(device):
    if device == "cpu" and not interpreting():
        pytest.skip("the kernel runs on the CPU only under Triton's interpreter")
    x = _values(device)
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=device)
    _cast_kernel[(1,)](x, y, x.numel(), device == "cpu")
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    # compared as values: the interpreter encodes -0.0 as +0.0
    assert torch.equal(y.float(), want.float())
