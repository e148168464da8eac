"""apply_rotary_emb (the fused rotary kernel, and PyTorch ops on the CPU path)
against a rotation through complex numbers, forward and backward."""

import pytest
import torch

from flashtile import apply_rotary_emb


def complex_rotation(x, angles, positions, interleaved):
    """x rotated by ``angles[positions]``, dims past the rotary ones unchanged (fp64)."""
    half = angles.shape[1]
    xr = x[..., :2 * half].double()
    if interleaved:
        pairs = xr.unflatten(-1, (half, 2))
    else:
        pairs = torch.stack([xr[..., :half], xr[..., half:]], dim=-1)
    z = torch.view_as_complex(pairs.contiguous()) * torch.polar(torch.ones_like(angles), angles)[positions].unsqueeze(-2)
    rotated = torch.view_as_real(z)
    rotated = rotated.flatten(-2) if interleaved else torch.cat([rotated[..., 0], rotated[..., 1]], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:].double()], dim=-1)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("rotary_dim", [32, 20])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_rotary_matches_complex_rotation(backend, dtype, layout, rotary_dim, interleaved, offsets):
    d, nheads = 32, 3
    angles = torch.rand(64, rotary_dim // 2, dtype=torch.float64) * 6
    cos, sin = angles.cos().float(), angles.sin().float()
    if layout == "dense":
        x = torch.randn(2, 13, nheads, d).to(dtype)
        first = torch.tensor([5, 0]) if offsets == "tensor" else 3
        positions = torch.arange(13)[None, :] + (first[:, None] if offsets == "tensor" else first)
        kw = dict(seqlen_offsets=first)
    else:
        lengths = [7, 0, 13]
        cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
        x = torch.randn(20, nheads, d).to(dtype)
        first = torch.tensor([2, 9, 1]) if offsets == "tensor" else 4
        starts = torch.repeat_interleave(torch.tensor([0, 7, 7]), torch.tensor(lengths))
        seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
        positions = torch.arange(20) - starts + (first[seq] if offsets == "tensor" else first)
        kw = dict(seqlen_offsets=first, cu_seqlens=cu, max_seqlen=13)
    xg = x.detach().requires_grad_()
    out = apply_rotary_emb(xg, cos, sin, interleaved, **kw)
    ref = complex_rotation(x, angles, positions, interleaved)
    tol = TOL[dtype] * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)
    # the gradient rotates back: for a loss g . out, dx = rotation by -angle of g
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, xg, g)
    torch.testing.assert_close(dx.double(), complex_rotation(g, -angles, positions, interleaved), rtol=0, atol=tol)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_in_place(backend, interleaved):
    angles = torch.rand(40, 8, dtype=torch.float64)
    x = torch.randn(2, 9, 2, 24)
    expected = complex_rotation(x, angles, torch.arange(9)[None, :] + 2, interleaved).float()
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0  # in place on a non-leaf, as a model does with its q/k projections
    out = apply_rotary_emb(y, angles.cos().float(), angles.sin().float(), interleaved, inplace=True, seqlen_offsets=2)
    assert out is y
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(leaf.grad.double(), complex_rotation(g, -angles, torch.arange(9)[None, :] + 2,
                                                                    interleaved), rtol=0, atol=1e-5)


def test_rotary_bad_input():
    cos = sin = torch.randn(8, 4)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary_emb(torch.randn(1, 6, 2, 8), cos, sin, seqlen_offsets=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(torch.randn(1, 6, 2, 6), cos, sin)
    with pytest.raises(ValueError, match="max_seqlen"):
        apply_rotary_emb(torch.randn(6, 2, 8), cos, sin, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="floating"):
        apply_rotary_emb(torch.ones(1, 6, 2, 8, dtype=torch.int64), cos, sin)


def test_rotary_compiles():
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    fn = torch.compile(lambda x: apply_rotary_emb(x, cos, sin, seqlen_offsets=2), fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 6, 2, 8, requires_grad=True)
    torch.testing.assert_close(fn(x), apply_rotary_emb(x, cos, sin, seqlen_offsets=2))
    fn(x).sum().backward()
    assert x.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_gpu(dtype, interleaved):
    angles = torch.rand(5000, 32, dtype=torch.float64, device="cuda") * 6
    x = torch.randn(4, 4000, 8, 128, device="cuda").to(dtype)
    first = torch.randint(0, 900, (4,), device="cuda")
    out = apply_rotary_emb(x, angles.cos().float(), angles.sin().float(), interleaved, seqlen_offsets=first)
    ref = complex_rotation(x, angles, torch.arange(4000, device="cuda")[None, :] + first[:, None], interleaved)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=TOL[dtype] * ref.abs().max().item())
