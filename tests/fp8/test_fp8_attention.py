"""flashtile.fp8.flash_attn_fp8_func: quantise_qkv followed by flash_attn_func's FP8
forward (``flash_attn_func(..., q_descale=, k_descale=, v_descale=, out_dtype=)``)."""

import math

import pytest
import torch

import flashtile
from flashtile.fp8 import flash_attn_fp8_func, quantize_qkv
from flashtile.testing import attention_ref


def _inputs(batch=2, seqlen_q=200, seqlen_k=77, nheads=4, nheads_k=2, d=64, dtype=torch.bfloat16, device="cpu"):
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(40, 8), softcap=20.0)])
def test_same_as_flash_attn_func_on_quantised_inputs(scaling, kw):
    q, k, v = _inputs()
    out = flash_attn_fp8_func(q, k, v, scaling=scaling, seed=3, **kw)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling=scaling, seed=3)
    want = flashtile.flash_attn_func(q8, k8, v8, softmax_scale=1 / math.sqrt(64), q_descale=qd, k_descale=kd,
                                     v_descale=vd, out_dtype=torch.bfloat16, **kw)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.equal(out, want)


@pytest.mark.parametrize("scaling", ["tensor", "block"])
@pytest.mark.parametrize("incoherent", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_accuracy_against_the_reference(scaling, incoherent, causal):
    """Against fp64 attention on the unquantised inputs: errors of e4m3's size (3
    mantissa bits: a few percent), loose bounds that catch a misapplied scale or a
    rotation that does not cancel."""
    q, k, v = _inputs(dtype=torch.float32)
    out = flash_attn_fp8_func(q, k, v, causal=causal, scaling=scaling, incoherent=incoherent)
    assert out.dtype == torch.float32 and not out.isnan().any()
    ref = attention_ref(q, k, v, causal=causal, compute_dtype=torch.float64)
    err = out.double() - ref.double()
    assert err.norm() <= 0.1 * ref.double().norm()
    assert err.abs().max() <= 0.25 * ref.double().abs().max()


def test_defaults_and_out_dtype():
    q, k, v = _inputs(nheads=2, nheads_k=1, d=40, seqlen_q=64, seqlen_k=64, dtype=torch.float16)
    out = flash_attn_fp8_func(q, k, v)
    assert out.dtype == torch.float16
    assert torch.equal(out, flash_attn_fp8_func(q, k, v, softmax_scale=1 / math.sqrt(40)))
    assert flash_attn_fp8_func(q, k, v, out_dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("incoherent", [False, True])
def test_options_gqa_ragged_blocks(scaling, incoherent):
    """The arguments reach flash_attn_func as its contract says, the rotation cancels in
    the scores, the default scale is 1/sqrt(headdim) and the output dtype q's, GQA and
    ragged blocks included."""
    q, k, v = _inputs(nheads=6, nheads_k=2, d=40, seqlen_q=150, seqlen_k=131, dtype=torch.float32)
    for kw in (dict(), dict(causal=True), dict(window_size=(30, 5), softcap=15.0, softmax_scale=0.3)):
        out = flash_attn_fp8_func(q, k, v, scaling=scaling, incoherent=incoherent, **kw)
        assert out.dtype == torch.float32 and out.shape == q.shape
        ref = attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
        err = out.double() - ref
        assert err.norm() <= 0.1 * ref.norm() and err.abs().max() <= 0.25 * ref.abs().max(), kw
    assert flash_attn_fp8_func(q.half(), k.half(), v.half()).dtype == torch.float16
    assert flash_attn_fp8_func(q, k, v, out_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_accuracy(causal):
    q, k, v = _inputs(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_k=4, d=128, device="cuda")
    ref = attention_ref(q, k, v, causal=causal, compute_dtype=torch.float64)
    out = flash_attn_fp8_func(q, k, v, causal=causal)
    err = out.double() - ref
    assert err.norm() <= 0.1 * ref.norm() and err.abs().max() <= 0.25 * ref.abs().max()
