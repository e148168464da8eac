"""Cosine-similarity attention (fixed softmax offset) against plain_cosine_sim_attention in fp64.

CPU tests run the Triton kernels in the interpreter; the ``gpu`` ones need a CUDA GPU.
"""

import math

import pytest
import torch
from helpers import check_attention, max_err, rounding_floor

import flashtile
from flashtile import flash_attn_func, flash_cosine_sim_attention, l2norm_tensors
from flashtile.backends.torch_tiled import attention_tiled_forward
from flashtile.backends.triton.launch import attention as launch_attention
from flashtile.backends.triton.launch import device as launch_device
from flashtile.ops.attention import attention
from flashtile.options import AttnOptions
from flashtile.testing import plain_cosine_sim_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cosine_ref(q, k, v, upcast=True, compute_dtype=None, **kw):
    """plain_cosine_sim_attention with attention_ref's precision arguments (for check_attention)."""
    return plain_cosine_sim_attention(q, k, v, compute_dtype=(compute_dtype or torch.float32) if upcast else None,
                                      **kw)


def check_cosine(q, k, v, *, mask=None, bias=None, dtype=torch.float32, backward=True, **kw):
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if bias is not None:
        bias = bias.to(dtype).requires_grad_()

        def fn(q, k, v, bias):
            return flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, **kw)
    else:
        def fn(q, k, v):
            return flash_cosine_sim_attention(q, k, v, mask=mask, **kw)

    check_attention(fn, q, k, v, bias=bias, backward=backward, ref_fn=cosine_ref, mask=mask, **kw)


def key_padding(batch, seqlen_k, keep=0.7):
    mask = torch.rand(batch, seqlen_k) < keep
    mask[:, 0] = True
    return mask


# (name, q shape, k/v shape, options); q/k/v in (b, h, n, d) or the 3-D forms
CASES = {
    "plain": ((2, 2, 127, 64), (2, 2, 127, 64), {}),
    "causal": ((2, 2, 127, 32), (2, 2, 127, 32), dict(causal=True)),
    "causal_cross": ((1, 2, 63, 48), (1, 2, 127, 48), dict(causal=True)),
    "cross": ((2, 2, 127, 40), (2, 2, 63, 40), {}),
    "mask": ((2, 2, 63, 64), (2, 2, 127, 64), dict(mask=True)),
    "bias": ((2, 2, 63, 96), (2, 2, 63, 96), dict(bias="heads")),
    "bias_batch_dim": ((2, 2, 63, 32), (2, 2, 127, 32), dict(bias="batch", attn_bias_batch_dim=True)),
    "single_head_kv": ((2, 3, 127, 64), (2, 127, 64), dict(causal=True)),
    "merged_dims": ((4, 63, 32), (4, 127, 32), dict(bias="batch")),
    "groups": ((2, 2, 63, 128), (2, 2, 63, 128), dict(groups=4)),
    "l2norm_off": ((2, 2, 63, 64), (2, 2, 63, 64), dict(l2norm_qk=False, prenorm=True)),
    "everything": ((2, 2, 63, 64), (2, 63, 64), dict(causal=True, mask=True, bias="heads", groups=2, scale=12)),
    "head_dim_256": ((1, 2, 63, 256), (1, 2, 63, 256), dict(causal=True)),
    "head_dim_16": ((2, 2, 63, 16), (2, 2, 127, 16), dict(mask=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_against_plain(case, dtype):
    shape_q, shape_k, opts = CASES[case]
    opts = dict(opts)
    q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_k)
    batch, seqlen_q, seqlen_k = shape_k[0], shape_q[-2], shape_k[-2]
    mask = key_padding(batch, seqlen_k) if opts.pop("mask", False) else None
    bias = None
    kind = opts.pop("bias", None)
    if kind is not None:
        lead = shape_q[1] if kind == "heads" else shape_q[0]
        bias = torch.randn(lead, seqlen_q, seqlen_k)
    if opts.pop("prenorm", False):
        q, k = l2norm_tensors(q, k)
    check_cosine(q, k, v, mask=mask, bias=bias, dtype=dtype, **opts)


def test_single_head_kv_gradients_sum_over_heads():
    # dK/dV of the shared key/value head must sum the contributions of every query head
    q = torch.randn(2, 4, 63, 32)
    k, v = (torch.randn(2, 63, 32, requires_grad=True) for _ in range(2))
    out = flash_cosine_sim_attention(q, k, v)
    dout = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (k, v), dout)
    k4, v4 = (t.detach().double()[:, None].expand(-1, 4, -1, -1).clone().requires_grad_() for t in (k, v))
    ref = plain_cosine_sim_attention(q.double(), k4, v4)
    dk4, dv4 = torch.autograd.grad(ref, (k4, v4), dout.double())
    torch.testing.assert_close(dk.double(), dk4.sum(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv.double(), dv4.sum(1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["mask", "mask_bias"])
def test_fully_masked_rows_are_zero(dtype, with_bias):
    q = torch.randn(2, 2, 40, 32, dtype=dtype)
    k, v = (torch.randn(2, 2, 50, 32, dtype=dtype) for _ in range(2))
    bias = torch.randn(2, 40, 50, dtype=dtype, requires_grad=True) if with_bias else None
    mask = key_padding(2, 50)
    mask[1] = False  # the second sequence has no key at all
    check_cosine(q, k, v, mask=mask, bias=bias, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v) + ((bias,) if with_bias else ()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][1] == 0) and torch.all(grads[2][1] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_rows_without_keys_are_zero(dtype):
    # bottom-right causal with more queries than keys: the first 20 rows see no key
    q, k, v = torch.randn(1, 2, 70, 32), torch.randn(1, 2, 50, 32), torch.randn(1, 2, 50, 32)
    check_cosine(q, k, v, dtype=dtype, causal=True)
    out = flash_cosine_sim_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
    assert torch.all(out[:, :, :20] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [10, 16])
@pytest.mark.parametrize("inputs", ["random", "aligned", "opposed"])
def test_high_scale_no_overflow(dtype, scale, inputs):
    # scores span [-scale, scale]: aligned keys reach the bound; with causal, the first rows
    # see only their own opposed key, 2 * scale below the bound (fp16 at scale 10: the
    # fixed offset's worst case; at 16 fp16 takes the running max)
    q = torch.randn(2, 2, 63, 64)
    k = {"random": torch.randn(2, 2, 63, 64), "aligned": q + 0.05 * torch.randn(2, 2, 63, 64),
         "opposed": -q + 0.05 * torch.randn(2, 2, 63, 64)}[inputs]
    # near one-hot rows in bf16: dq/dk are limited by delta = rowsum(dO * O) from the rounded O,
    # as in the softmax kernels, which PyTorch's bf16 softmax backward does not see
    backward = not (inputs == "aligned" and dtype == torch.bfloat16)
    check_cosine(q, k, torch.randn(2, 2, 63, 64), dtype=dtype, scale=scale, causal=True, backward=backward)


def test_fixed_offset_choice():
    # bf16/fp32 always take the fixed offset; fp16 while its range holds [-bound, bound]
    opts = AttnOptions(16.0, fixed_max=16.0)
    assert launch_attention.fixed_offset(opts, torch.bfloat16) is not None
    assert launch_attention.fixed_offset(opts, torch.float32) is not None
    assert launch_attention.fixed_offset(opts, torch.float16) is None
    assert launch_attention.fixed_offset(opts._replace(fixed_max=10.0), torch.float16) is not None
    assert launch_attention.fixed_offset(opts._replace(fixed_max=None), torch.bfloat16) is None


def test_positive_bias_raises_the_bound():
    # a bias of +12 on top of scale 16 would overflow fp16 probabilities without its maximum in the bound
    q = torch.randn(1, 2, 63, 32)
    bias = torch.randn(2, 63, 63) + 12.0 * (torch.rand(2, 63, 63) < 0.1)
    check_cosine(q, q + 0.05 * torch.randn_like(q), torch.randn(1, 2, 63, 32), bias=bias, dtype=torch.float16,
                 scale=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fixed_max_kernel_equals_softmax_attention(dtype, causal):
    # the fixed-offset kernel and the running-max kernel on the same normalised inputs:
    # same output up to rounding, same (exact) LSE
    q, k = l2norm_tensors(torch.randn(2, 77, 4, 48, dtype=dtype), torch.randn(2, 113, 2, 48, dtype=dtype))
    v = torch.randn(2, 113, 2, 48, dtype=dtype)
    scale, diag = 10.0, 113 - 77
    window = (-1, 0 if causal else -1)
    assert launch_attention.fixed_offset(AttnOptions(scale, fixed_max=scale), dtype) is not None
    out_fixed, lse_fixed = attention(q, k, v, scale, diag, window=window, fixed_max=scale)
    out_soft, lse_soft = attention(q, k, v, scale, diag, window=window)
    ref, lse_ref = flashtile.testing.attention_ref(q, k, v, softmax_scale=scale, causal=causal, return_lse=True,
                                           compute_dtype=torch.float64)
    torch.testing.assert_close(lse_fixed, lse_ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_soft, lse_ref.float(), atol=1e-5, rtol=1e-5)
    floor = rounding_floor(ref, dtype)
    assert max_err(out_fixed, ref) <= 2 * max_err(out_soft, ref) + floor
    assert max_err(out_fixed, out_soft) <= 2 * floor + 2 * max_err(out_soft, ref)
    # and the public API is the same computation as flash_attn_func on the normalised inputs
    api = flash_cosine_sim_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                     causal=causal, l2norm_qk=False).transpose(1, 2)
    flash = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    assert max_err(api, flash) <= 2 * floor + 2 * max_err(flash, ref)


def test_fixed_max_has_no_running_max():
    # scores 300 below the announced bound: a fixed offset underflows (exp(-300) in fp32),
    # a running max would not; this shows the kernel really uses the offset it is given
    q = torch.ones(1, 32, 1, 16) / 4
    k = -torch.ones(1, 32, 1, 16) / 4
    v = torch.randn(1, 32, 1, 16)
    out_fixed, lse_fixed = attention(q, k, v, 300.0, 0, fixed_max=300.0)
    out_soft, lse_soft = attention(q, k, v, 300.0, 0)
    assert torch.all(out_fixed == 0) and torch.all(lse_fixed == float("-inf"))
    torch.testing.assert_close(lse_soft, torch.full_like(lse_soft, -300.0 + math.log(32)))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_cpu_path(monkeypatch, causal):
    # without the interpreter CPU tensors take the tiled PyTorch path (fixed offset too)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not launch_device.interpreting()
    q, k, v = torch.randn(2, 3, 150, 40), torch.randn(2, 300, 40), torch.randn(2, 300, 40)
    bias = torch.randn(3, 150, 300)
    check_cosine(q, k, v, mask=key_padding(2, 300), bias=bias, causal=causal, groups=2)
    # the tiled forward with and without the fixed offset
    qn, kn = l2norm_tensors(q.transpose(1, 2), k[:, :, None])
    opts = AttnOptions(8.0, 150, -1, 0 if causal else -1)
    out_a, lse_a = attention_tiled_forward(qn, kn, v[:, :, None], opts, block_m=64, block_n=64)
    out_b, lse_b = attention_tiled_forward(qn, kn, v[:, :, None], opts._replace(fixed_max=8.0), block_m=64,
                                           block_n=64)
    torch.testing.assert_close(out_a, out_b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_a, lse_b, atol=1e-6, rtol=1e-6)


def test_compile_fullgraph():
    fn = torch.compile(lambda q, k, v, b: flash_cosine_sim_attention(q, k, v, attn_bias=b, causal=True),
                       fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 2, 40, 32, requires_grad=True)
    k, v = (torch.randn(1, 40, 32, requires_grad=True) for _ in range(2))
    b = torch.randn(2, 40, 40, requires_grad=True)
    out = fn(q, k, v, b)
    expected = flash_cosine_sim_attention(q, k, v, attn_bias=b, causal=True)
    torch.testing.assert_close(out, expected)
    for a, e in zip(torch.autograd.grad(out.sum(), (q, k, v, b)), torch.autograd.grad(expected.sum(), (q, k, v, b))):
        torch.testing.assert_close(a, e)


def test_l2norm_tensors_groups():
    x = torch.randn(3, 5, 24, dtype=torch.float16)
    (y,) = l2norm_tensors(x, groups=3)
    assert y.dtype == x.dtype and y.shape == x.shape
    norms = y.float().unflatten(-1, (3, 8)).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=2e-3, rtol=0)
    assert torch.all((y.float() * x.float()).unflatten(-1, (3, 8)).sum(-1) > 0)  # same direction per group


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 3, 5, 64), 1), ((2, 7, 48), 3), ((4, 1, 40), 2), ((3, 5, 1), 1)])
def test_l2norm_kernel_forward_and_gradient(shape, groups, dtype):
    """The one-launch l2norm (Triton) against PyTorch's normalize in fp64: within the
    output dtype's rounding, gradients included; a zero vector stays zero (its
    gradient, dy / eps, is not compared: it overflows 16-bit types in PyTorch too)."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    (y,) = l2norm_tensors(x, groups=groups)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    yr = torch.nn.functional.normalize(xr.unflatten(-1, (groups, -1)), dim=-1).flatten(-2)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert y.dtype == dx.dtype == dtype
    assert max_err(y, yr) <= rounding_floor(yr, dtype)
    assert max_err(dx, dxr) <= rounding_floor(dxr, dtype, dxr.abs().max().item())
    zero = torch.zeros(shape[-1], dtype=dtype)
    assert torch.equal(l2norm_tensors(zero, groups=groups)[0], zero)


BAD = [
    (dict(q=torch.randn(1, 2, 8, 16).int()), TypeError, "q"),
    (dict(k=torch.randn(1, 2, 8, 16).double()), TypeError, "k"),
    (dict(q=torch.randn(2, 8, 16)), ValueError, "k and v must be 3-D"),
    (dict(q=torch.randn(8, 16)), ValueError, "q must be 4-D"),
    (dict(v=torch.randn(1, 8, 16)), ValueError, "k and v"),
    (dict(mask=torch.ones(1, 8)), TypeError, "mask"),
    (dict(mask=torch.ones(1, 9, dtype=torch.bool)), ValueError, "mask"),
    (dict(attn_bias=torch.ones(2, 8, 8, dtype=torch.bool)), TypeError, "attn_bias"),
    (dict(attn_bias=torch.ones(3, 8, 8)), ValueError, "attn_bias"),
    (dict(attn_bias=torch.ones(2, 8, 8), attn_bias_batch_dim=True), ValueError, "attn_bias"),
    (dict(groups=3), ValueError, "groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale="8"), TypeError, "scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(q=torch.randn(1, 2, 8, 300), k=torch.randn(1, 2, 8, 300)), ValueError, "head dim"),
]


@pytest.mark.parametrize("bad, error, name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input(bad, error, name):
    args = dict(q=torch.randn(1, 2, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update(bad)
    if "k" in bad and "v" not in bad and bad["k"].dtype == torch.float32:
        args["v"] = torch.randn(bad["k"].shape)
    with pytest.raises(error, match=name):
        flash_cosine_sim_attention(**args)


# --- GPU ----------------------------------------------------------------------------------

GPU_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "mask_bias": dict(mask=True, bias="heads"),
    "single_head_kv_causal": dict(single_kv=True, causal=True),
    "bias_batch_dim_groups": dict(bias="batch", attn_bias_batch_dim=True, groups=4, scale=12),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_against_plain_gpu(case, head_dim, dtype):
    opts = dict(GPU_CASES[case])
    b, h, i, j = 2, 4, 1000, 1500
    q = torch.randn(b, h, i, head_dim, device="cuda")
    kv_shape = (b, j, head_dim) if opts.pop("single_kv", False) else (b, h, j, head_dim)
    k, v = torch.randn(kv_shape, device="cuda"), torch.randn(kv_shape, device="cuda")
    mask = key_padding(b, j).cuda() if opts.pop("mask", False) else None
    kind = opts.pop("bias", None)
    bias = None if kind is None else torch.randn(h if kind == "heads" else b, i, j, device="cuda")
    check_cosine(q, k, v, mask=mask, bias=bias, dtype=dtype, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_causal_scale_16_gpu(dtype):
    q, k, v = (torch.randn(1, 8, 8192, 64, device="cuda") for _ in range(3))
    check_cosine(q, k, v, dtype=dtype, scale=16, causal=True)


@pytest.mark.gpu
def test_merged_dims_gpu():
    q, k, v = torch.randn(16, 777, 64, device="cuda"), torch.randn(16, 1300, 64, device="cuda"), \
        torch.randn(16, 1300, 64, device="cuda")
    check_cosine(q, k, v, bias=torch.randn(16, 777, 1300, device="cuda"), dtype=torch.float16, causal=True)
