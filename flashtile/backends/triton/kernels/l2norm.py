"""l2 normalisation of sub-vectors (cosine-similarity attention's q and k), one
launch forward and one backward instead of a chain of small PyTorch ops.

The input is viewed as ``(rows, GROUP_DIM)`` contiguous rows, each row one
sub-vector: ``y = x / max(||x||, eps)`` in fp32, stored in the input dtype.
The backward recomputes the norm from ``x`` (nothing saved but ``x``):
``dx = (dy - y * (dy . y)) / max(||x||, eps)``.
"""

import triton
import triton.language as tl

EPS = tl.constexpr(1e-12)  # torch.nn.functional.normalize's


@triton.jit
def _rows(X, pid, n_rows, GROUP_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    offs = rows[:, None].to(tl.int64) * GROUP_DIM + cols[None, :]
    ok = (rows[:, None] < n_rows) & (cols[None, :] < GROUP_DIM)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), EPS)
    return offs, ok, x, inv


@triton.jit
def l2norm_fwd_kernel(X, Y, n_rows, GROUP_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid: (cdiv(n_rows, BLOCK_R),)."""
    offs, ok, x, inv = _rows(X, tl.program_id(0), n_rows, GROUP_DIM, BLOCK_R, BLOCK_D)
    tl.store(Y + offs, (x * inv[:, None]).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def l2norm_bwd_kernel(X, DY, DX, n_rows, GROUP_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid: (cdiv(n_rows, BLOCK_R),)."""
    offs, ok, x, inv = _rows(X, tl.program_id(0), n_rows, GROUP_DIM, BLOCK_R, BLOCK_D)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    y = x * inv[:, None]
    dx = (dy - y * tl.sum(dy * y, 1)[:, None]) * inv[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
