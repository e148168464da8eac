"""Launcher of the l2-normalisation kernels (cosine-similarity attention)."""

from __future__ import annotations

import torch

from .device import block_d_of, cdiv


def l2norm_launch(kernel, group_dim: int, *tensors: torch.Tensor) -> None:
    """Run ``kernel`` (forward or backward) over the rows of ``tensors``, each row
    of ``group_dim`` values normalised on its own."""
    rows = tensors[0].numel() // group_dim
    block_d = block_d_of(group_dim)
    block_r = max(1, min(64, 4096 // block_d))
    kernel[(cdiv(rows, block_r),)](*tensors, rows, GROUP_DIM=group_dim, BLOCK_R=block_r, BLOCK_D=block_d)
