"""FP8 attention (float8_e4m3fn q, k, v with descales), forward only, on the Triton
kernel (interpreter, also with the two-halves schedule) and on the tiled PyTorch
path, against attention_ref in fp64 on the dequantised inputs.

The kernels round the probabilities to e4m3 for their product with V (as
FlashAttention-3 does): each output element is then off by at most 2**-4 (half
an e4m3 step, relative) of the largest |v| a row sees, plus the rounding of the
output dtype. That bound is what the tests check, with a margin of 1.25; a wrong
descale, block index or mask breaks it by orders of magnitude."""

import math

import pytest
import torch
from helpers import cu

from flashtile import FlashtileTypeError, FlashtileValueError, flash_attn_func, flash_attn_varlen_func
from flashtile.options import FP8_MAX, FP8_SCALE_BLOCK
from flashtile.testing import attention_ref

E4M3 = torch.float8_e4m3fn


def _quantize(x: torch.Tensor, nheads_k: int, blocks: bool):
    """x (b, s, h, d) -> (fp8, descale): per (batch, kv head), or per block of rows too."""
    b, s, h, d = x.shape
    g = x.reshape(b, s, nheads_k, h // nheads_k, d)
    if blocks:
        n = math.ceil(s / FP8_SCALE_BLOCK)
        padded = torch.nn.functional.pad(g.abs(), (0, 0, 0, 0, 0, 0, 0, n * FP8_SCALE_BLOCK - s))
        amax = padded.reshape(b, n, FP8_SCALE_BLOCK, nheads_k, h // nheads_k * d).amax((2, 4)).transpose(1, 2)  # (b, hk, n)
        descale = amax.clamp_min(1e-6) / FP8_MAX
        rows = torch.arange(s) // FP8_SCALE_BLOCK
        scale = descale[:, :, rows].transpose(1, 2)[:, :, :, None, None]
    else:
        amax = g.abs().amax((1, 3, 4)) if s else g.new_ones(b, nheads_k)
        descale = amax.clamp_min(1e-6) / FP8_MAX  # (b, hk)
        scale = descale[:, None, :, None, None]
    x8 = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3).reshape(b, s, h, d)
    return x8, descale.float().contiguous()


def _dequantize(x8, descale):
    from flashtile.ops.fp8 import dequantize

    return dequantize(x8, descale)


def _check(out, q8, k8, v8, qd, kd, vd, out_dtype=torch.bfloat16, **ref_kw):
    qf, kf, vf = (_dequantize(t, d).double() for t, d in ((q8, qd), (k8, kd), (v8, vd)))
    ref = attention_ref(qf, kf, vf, **ref_kw)
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert out.isfinite().all()
    bound = 2.0**-4 * vf.abs().amax().item() + 2 * torch.finfo(out_dtype).eps * ref.abs().amax().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 1.25 * bound, f"max error {err:.3g} above the e4m3 bound {bound:.3g}"
    # and far from a wrong result: the typical error is well below the bound
    assert (out.double() - ref).abs().mean().item() <= 0.25 * bound


def _inputs(b, sq, sk, h, hk, d, blocks, seed=0, dv=None):
    torch.manual_seed(seed)
    q = torch.randn(b, sq, h, d) * 2
    k = torch.randn(b, sk, hk, d)
    v = torch.randn(b, sk, hk, dv or d)
    (q8, qd), (k8, kd) = _quantize(q, hk, blocks), _quantize(k, hk, blocks)
    v8, vd = _quantize(v, hk, False)
    return q8, k8, v8, qd, kd, vd


@pytest.mark.parametrize("blocks", [False, True], ids=["per_head", "per_block"])
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
def test_dense(backend, blocks, mask):
    q8, k8, v8, qd, kd, vd = _inputs(2, 150, 203, 4, 2, 40, blocks)
    kw = dict(causal=mask == "causal", window_size=(50, 7) if mask == "window" else (-1, -1))
    out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, **kw)
    _check(out, q8, k8, v8, qd, kd, vd, causal=kw["causal"], window_size=kw["window_size"])


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_options_and_out_dtype(backend, out_dtype):
    """softcap, ALiBi and sinks on FP8 inputs, head dims not powers of two (q/k 59, v 24)."""
    q8, k8, v8, qd, kd, vd = _inputs(1, 70, 90, 6, 3, 59, True, seed=1, dv=24)
    slopes, sinks = torch.rand(6) * 0.2, torch.randn(6)
    out, lse, none = flash_attn_func(q8, k8, v8, causal=True, softcap=4.0, alibi_slopes=slopes, sinks=sinks,
                                     q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=out_dtype,
                                     return_attn_probs=True)
    assert none is None and lse.shape == (1, 6, 70) and lse.dtype == torch.float32
    _check(out, q8, k8, v8, qd, kd, vd, out_dtype, causal=True, softcap=4.0, alibi_slopes=slopes, sinks=sinks)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_varlen(backend, paged):
    """Block scales counted from each sequence's start (sequences of 0, 1, 140 and 77 queries)."""
    lens_q, lens_k = [0, 1, 140, 77], [5, 0, 150, 140]
    hk, d = 2, 32
    torch.manual_seed(2)
    qs = [_quantize(torch.randn(1, n, 4, d), hk, True) for n in lens_q]
    ks = [_quantize(torch.randn(1, n, hk, d), hk, True) for n in lens_k]
    vs = [_quantize(torch.randn(1, n, hk, d), hk, False) for n in lens_k]
    nblk_q, nblk_k = math.ceil(max(lens_q) / FP8_SCALE_BLOCK), math.ceil(max(lens_k) / FP8_SCALE_BLOCK)

    def descales(parts, nblk):
        return torch.stack([torch.nn.functional.pad(d[0], (0, nblk - d.shape[-1]), value=1.0) if d.dim() == 3
                            else d[0] for _, d in parts])

    q8 = torch.cat([x[0] for x, _ in qs])
    k8, v8 = torch.cat([x[0] for x, _ in ks]), torch.cat([x[0] for x, _ in vs])
    qd, kd, vd = descales(qs, nblk_q), descales(ks, nblk_k), torch.stack([d[0] for _, d in vs])
    kw = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    if paged:
        page = 16
        pages_per_seq = math.ceil(max(lens_k) / page)
        table = torch.randperm(4 * pages_per_seq).reshape(4, pages_per_seq).to(torch.int32)
        k_cache = torch.zeros(4 * pages_per_seq, page, hk, d, dtype=E4M3)
        v_cache = torch.zeros_like(k_cache)
        for i, n in enumerate(lens_k):
            rows = torch.arange(n)
            k_cache[table[i, rows // page].long(), rows % page] = ks[i][0][0]
            v_cache[table[i, rows // page].long(), rows % page] = vs[i][0][0]
        out = flash_attn_varlen_func(q8, k_cache, v_cache, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                     causal=True, block_table=table, **kw)
    else:
        out = flash_attn_varlen_func(q8, k8, v8, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), causal=True,
                                     **kw)
    assert out.shape == (sum(lens_q), 4, d) and out.dtype == torch.bfloat16
    start = 0
    for i, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
        o = out[start:start + n_q]
        if n_k == 0:
            assert (o == 0).all()
        elif n_q:
            _check(o[None], qs[i][0], ks[i][0], vs[i][0], qs[i][1], ks[i][1], vs[i][1], causal=True)
        start += n_q


def test_matches_bf16_attention_closely(backend):
    """On inputs that FP8 represents well, the FP8 result is close to bf16 attention of the
    same (dequantised) values: the kernels read the descales where they belong."""
    q8, k8, v8, qd, kd, vd = _inputs(1, 130, 140, 2, 1, 64, True, seed=3)
    out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=torch.float32)
    bf16 = flash_attn_func(*(_dequantize(t, d).bfloat16() for t, d in ((q8, qd), (k8, kd), (v8, vd))))
    assert (out - bf16.float()).abs().max() < 0.05


def test_backward_is_refused(backend):
    q8, k8, v8, qd, kd, vd = _inputs(1, 20, 20, 2, 2, 16, False)
    q8.requires_grad_()
    out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    with pytest.raises(NotImplementedError, match="backward pass of FP8 attention"):
        out.float().sum().backward()


def test_bad_input():
    q8, k8, v8, qd, kd, vd = _inputs(2, 20, 30, 4, 2, 16, False)
    kw = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    with pytest.raises(FlashtileValueError, match="v_descale is missing"):
        flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd)
    with pytest.raises(FlashtileValueError, match="k_descale must have shape"):
        flash_attn_func(q8, k8, v8, **(kw | dict(k_descale=kd[:, :1])))
    with pytest.raises(FlashtileValueError, match="v_descale must have shape"):
        flash_attn_func(q8, k8, v8, **(kw | dict(v_descale=torch.ones(2, 2, 1))))
    with pytest.raises(FlashtileTypeError, match="q_descale must be float32"):
        flash_attn_func(q8, k8, v8, **(kw | dict(q_descale=qd.half())))
    with pytest.raises(FlashtileTypeError, match="only float8_e4m3fn"):
        flash_attn_func(q8.to(torch.float8_e5m2), k8, v8, **kw)
    with pytest.raises(FlashtileTypeError, match="must all be float8_e4m3fn"):
        flash_attn_func(q8, k8.bfloat16(), v8, **kw)
    with pytest.raises(FlashtileValueError, match="q_descale, k_descale, v_descale apply to float8_e4m3fn"):
        flash_attn_func(q8.bfloat16(), k8.bfloat16(), v8.bfloat16(), **kw)
    with pytest.raises(FlashtileValueError, match="out_dtype apply"):
        flash_attn_func(q8.bfloat16(), k8.bfloat16(), v8.bfloat16(), out_dtype=torch.float16)
    with pytest.raises(FlashtileTypeError, match="out_dtype must be"):
        flash_attn_func(q8, k8, v8, out_dtype=torch.int8, **kw)
    with pytest.raises(NotImplementedError, match="dropout with FP8"):
        flash_attn_func(q8, k8, v8, dropout_p=0.1, **kw)
    # flash_attn users catch RuntimeError
    with pytest.raises(RuntimeError):
        flash_attn_func(q8, k8, v8)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [False, True], ids=["per_head", "per_block"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu(blocks, causal, head_dim):
    q8, k8, v8, qd, kd, vd = _inputs(2, 1100, 1500, 8, 2, head_dim, blocks)
    q8, k8, v8, qd, kd, vd = (t.cuda() for t in (q8, k8, v8, qd, kd, vd))
    out = flash_attn_func(q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)
    _check(out.cpu(), *(t.cpu() for t in (q8, k8, v8, qd, kd, vd)), causal=causal)


@pytest.mark.parametrize("blocks", [False, True], ids=["per_head", "per_block"])
def test_tensor_descriptors(monkeypatch, blocks):
    """K and the sequence-major V through tensor descriptors (the Hopper default from 1k
    keys a row): 160 keys, so the descriptors cover whole 16-byte rows of V's transpose."""
    from helpers import set_switch

    set_switch(monkeypatch, "FLASHTILE_FWD_TMA", "1")
    q8, k8, v8, qd, kd, vd = _inputs(2, 70, 160, 4, 2, 32, blocks, seed=4)
    out = flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd, v_descale=vd)
    _check(out, q8, k8, v8, qd, kd, vd, causal=True)
