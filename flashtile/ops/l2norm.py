"""l2 normalisation of groups of a vector's values (cosine-similarity attention),
with its gradient: one Triton launch each way on a GPU, PyTorch's ops on the CPU."""

from __future__ import annotations

import torch

from ..backends.torch_tiled import l2norm_grouped
from ..backends.triton.kernels.l2norm import l2norm_bwd_kernel, l2norm_fwd_kernel
from ..backends.triton.launch.device import interpreting
from ..backends.triton.launch.l2norm import l2norm_launch


class _L2Norm(torch.autograd.Function):
    """``l2norm_grouped`` in one Triton launch each way (fp32 inside)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: int) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        l2norm_launch(l2norm_fwd_kernel, x.shape[-1] // groups, x, y)
        ctx.save_for_backward(x)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        l2norm_launch(l2norm_bwd_kernel, x.shape[-1] // ctx.groups, x, dy.contiguous(), dx)
        return dx, None


def l2norm(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The Triton version for GPU tensors (and under the interpreter); PyTorch's ops
    on the CPU and while tracing (the compiler fuses them itself). fp64 stays in
    PyTorch (the kernels compute in fp32)."""
    if (t.is_cuda or interpreting()) and t.dtype != torch.float64 and t.numel() \
            and not torch.compiler.is_compiling():
        return _L2Norm.apply(t, groups)
    return l2norm_grouped(t, groups)

