"""flashtile.fp8.quantize_qkv and hadamard_matrix: the rotation is orthogonal and
reproducible, descales have each scaling's shape and are the block maxima / 448,
dequantised values are within e4m3's rounding of the (rotated) inputs, scores
survive quantisation, incoherent processing helps with outlier channels, and the
Triton kernel (under the interpreter) and the PyTorch path agree bit for bit."""

import pytest
import torch

from flashtile import FlashtileTypeError, FlashtileValueError
from flashtile.fp8 import hadamard_matrix, quantize_qkv
from flashtile.fp8.hadamard import hadamard_blocks
from flashtile.options import FP8_MAX, FP8_SCALE_BLOCK


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """CPU tensors run the Triton kernel under the interpreter, or the PyTorch path without it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    return request.param


def _inputs(batch=2, seqlen_q=200, seqlen_k=77, nheads=4, nheads_k=2, d=64, d_v=None, dtype=torch.float32,
            device="cpu"):
    q = torch.randn(batch, seqlen_q, nheads, d, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, nheads_k, d, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, nheads_k, d_v or d, dtype=dtype, device=device)
    return q, k, v


def _per_row(descale, seqlen, nheads):
    """A descale ``(b, hk)`` or ``(b, hk, blocks)`` as ``(b, seqlen, nheads, 1)``, for every row."""
    if descale.dim() == 2:
        descale = descale[:, :, None].expand(-1, -1, seqlen)
    else:
        descale = descale.repeat_interleave(FP8_SCALE_BLOCK, dim=-1)[..., :seqlen]
    nheads_k = descale.shape[1]
    return descale.repeat_interleave(nheads // nheads_k, dim=1).permute(0, 2, 1)[..., None]


def _rotated(x, incoherent, seed=0):
    r = hadamard_matrix(x.shape[-1], seed, dtype=torch.float64)
    return x.double() @ r if incoherent else x.double()


def _block_amax(y, nheads_k, scaling):
    """amax of rows y ``(b, s, h, d)`` per scale block, reduced as ``scaling`` says (fp64)."""
    b, s = y.shape[:2]
    per_pos = y.abs().reshape(b, s, nheads_k, -1).amax(-1)  # (b, s, hk)
    blocks = [per_pos[:, i:i + FP8_SCALE_BLOCK].amax(1) for i in range(0, s, FP8_SCALE_BLOCK)]
    amax = torch.stack(blocks, -1)  # (b, hk, blocks)
    if scaling == "head":
        return amax.amax(-1)
    if scaling == "tensor":
        return amax.amax().expand(b, nheads_k)
    return amax


# --- the rotation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 3, 16, 40, 59, 64, 80, 96, 111, 128, 192, 256])
def test_hadamard_matrix_is_orthogonal(d):
    r = hadamard_matrix(d, seed=3, dtype=torch.float64)
    assert r.shape == (d, d) and r.dtype == torch.float64
    torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    assert sum(hadamard_blocks(d)) == d


def test_hadamard_matrix_structure():
    # a power of two: every entry is +-1/sqrt(d), the rows of the Sylvester matrix with random signs
    r = hadamard_matrix(64, seed=0, dtype=torch.float64)
    assert torch.allclose(r.abs(), torch.full_like(r, 1 / 8))
    assert torch.equal(r[:, 0].sign(), (r * 8)[:, 0])  # first column: the signs themselves
    # 80 = 64 + 16: block-diagonal, blocks of 64 and 16
    assert hadamard_blocks(80) == [64, 16] and hadamard_blocks(192) == [128, 64]
    r = hadamard_matrix(80, seed=0, dtype=torch.float64)
    assert torch.count_nonzero(r[:64, 64:]) == 0 and torch.count_nonzero(r[64:, :64]) == 0
    assert torch.allclose(r[:64, :64].abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    assert torch.allclose(r[64:, 64:].abs(), torch.full((16, 16), 1 / 4, dtype=torch.float64))


def test_hadamard_matrix_is_reproducible():
    torch.manual_seed(123)
    a = hadamard_matrix(96, seed=5)
    torch.manual_seed(456)  # the global generator plays no part
    assert torch.equal(a, hadamard_matrix(96, seed=5))
    assert not torch.equal(a, hadamard_matrix(96, seed=6))
    assert hadamard_matrix(32, 0, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(FlashtileValueError, match="d must be between 1 and 256"):
        hadamard_matrix(257)
    with pytest.raises(FlashtileTypeError, match="seed"):
        hadamard_matrix(16, seed=1.5)


# --- shapes, dtypes and the descales -------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("nheads,nheads_k", [(4, 4), (6, 2), (3, 1)])
def test_descale_shapes_and_values(path, scaling, nheads, nheads_k):
    q, k, v = _inputs(nheads=nheads, nheads_k=nheads_k, d=32, d_v=24, seqlen_q=200, seqlen_k=77)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling=scaling, incoherent=True)
    for x, x8 in ((q, q8), (k, k8), (v, v8)):
        assert x8.shape == x.shape and x8.dtype == torch.float8_e4m3fn and x8.is_contiguous()
    for d in (qd, kd, vd):
        assert d.dtype == torch.float32 and d.is_contiguous() and torch.isfinite(d).all() and (d > 0).all()
    if scaling == "block":
        assert qd.shape == (2, nheads_k, 2) and kd.shape == (2, nheads_k, 1)
    else:
        assert qd.shape == kd.shape == (2, nheads_k)
    assert vd.shape == (2, nheads_k)
    # descale = amax / 448 of the rotated values (q: over the whole GQA group), v unrotated
    for x, d, rot in ((q, qd, True), (k, kd, True), (v, vd, False)):
        want = _block_amax(_rotated(x, rot), nheads_k, "head" if x is v and scaling == "block" else scaling) / FP8_MAX
        torch.testing.assert_close(d.double(), want, rtol=1e-6, atol=0)
    if scaling == "tensor":
        assert (qd == qd[0, 0]).all() and (kd == kd[0, 0]).all() and (vd == vd[0, 0]).all()
    # one fp8 value per block reaches +-448 (the block's max)
    per_row = q8.float().abs().amax(-1)  # (b, s, h)
    assert per_row.max() == FP8_MAX


def test_group_shares_its_kv_heads_scale(path):
    """With head scaling, a query head with large values raises its group's scale only."""
    q, k, v = _inputs(nheads=4, nheads_k=2, d=16, seqlen_q=40, seqlen_k=40)
    q[:, :, 1] *= 100  # group 0 = heads 0, 1
    _, _, _, qd, _, _ = quantize_qkv(q, k, v, scaling="head", incoherent=False)
    assert (qd[:, 0] > 20 * qd[:, 1]).all()
    torch.testing.assert_close(qd[:, 0].double(), q[:, :, :2].abs().amax((1, 2, 3)).double() / FP8_MAX)


# --- accuracy ------------------------------------------------------------------------------------------------------

def _check_dequantised(x, x8, descale, incoherent, seed=0):
    """Within e4m3's rounding: in the rotated space each value is off by at most half
    an ulp (2^-4 relative) or half a subnormal step (2^-10 x descale), give or take the
    fp32 rounding of the rotation; back in the
    input's space the error is at most 2^-4 of the block's largest magnitude."""
    per_row = _per_row(descale.double(), x.shape[1], x.shape[2])
    deq = x8.double() * per_row
    y = _rotated(x.float(), incoherent, seed)
    # plus the fp32 rounding of the kernel's rotation, about 2^-20 of the block's largest value
    bound = torch.maximum(y.abs() * 2.0**-4, per_row * 2.0**-10) + per_row * FP8_MAX * 2.0**-20
    assert ((deq - y).abs() <= bound).all(), ((deq - y).abs() - bound).max()
    back = deq @ hadamard_matrix(x.shape[-1], seed, dtype=torch.float64).T if incoherent else deq
    block_max = per_row * FP8_MAX
    assert ((back - x.double()).abs() <= 2.0**-4 * block_max).all()
    # in RMS, e4m3's relative error is about 2^-5
    assert (back - x.double()).norm() <= 2.0**-4 * x.double().norm()
    return back


@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("incoherent", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantised_values_and_scores(path, scaling, incoherent, dtype):
    q, k, v = _inputs(nheads=4, nheads_k=2, d=64, seqlen_q=200, seqlen_k=77, dtype=dtype)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling=scaling, incoherent=incoherent, seed=7)
    _check_dequantised(q, q8, qd, incoherent, seed=7)
    _check_dequantised(k, k8, kd, incoherent, seed=7)
    _check_dequantised(v, v8, vd, False)
    # scores from the dequantised (still rotated) q and k: (qR)(kR)^T = q k^T
    qr = q8.double() * _per_row(qd.double(), 200, 4)
    kr = (k8.double() * _per_row(kd.double(), 77, 2)).repeat_interleave(2, dim=2)
    s8 = torch.einsum("bshd,bthd->bhst", qr, kr)
    s = torch.einsum("bshd,bthd->bhst", q.double(), k.double().repeat_interleave(2, dim=2))
    assert (s8 - s).norm() <= 0.06 * s.norm()
    assert (s8 - s).abs().max() <= 0.1 * s.abs().max()


@pytest.mark.parametrize("d,seqlen", [(80, 77), (256, 40), (1, 130), (59, 33)])
def test_head_dims_not_powers_of_two_and_large(path, d, seqlen):
    q, k, v = _inputs(batch=1, nheads=2, nheads_k=1, d=d, seqlen_q=seqlen, seqlen_k=seqlen, dtype=torch.bfloat16)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling="block", incoherent=True, seed=1)
    _check_dequantised(q, q8, qd, True, seed=1)
    _check_dequantised(k, k8, kd, True, seed=1)
    _check_dequantised(v, v8, vd, False)


def test_incoherent_processing_helps_with_outlier_channels(path):
    """FlashAttention-3's case: a few channels of q and k far larger than the rest. The
    rotation spreads them, so the scores lose less to quantisation."""
    q, k, v = _inputs(batch=1, nheads=2, nheads_k=2, d=64, seqlen_q=128, seqlen_k=128)
    for ch, f in ((3, 60.0), (17, 30.0), (40, 100.0)):
        q[..., ch] *= f
        k[..., ch] *= f
    s = torch.einsum("bshd,bthd->bhst", q.double(), k.double())
    errors = {}
    for incoherent in (False, True):
        q8, k8, _, qd, kd, _ = quantize_qkv(q, k, v, scaling="block", incoherent=incoherent)
        qr = q8.double() * _per_row(qd.double(), 128, 2)
        kr = k8.double() * _per_row(kd.double(), 128, 2)
        errors[incoherent] = (torch.einsum("bshd,bthd->bhst", qr, kr) - s).norm().item()
    assert errors[True] < 0.7 * errors[False], errors


def test_zero_inputs_give_finite_descales(path):
    q, k, v = _inputs(batch=1, nheads=2, nheads_k=1, d=32, seqlen_q=200, seqlen_k=77)
    q[:, 128:] = 0  # the second scale block of q is all zeros
    k.zero_()
    v.zero_()
    for scaling in ("tensor", "head", "block"):
        q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling=scaling)
        for d in (qd, kd, vd):
            assert torch.isfinite(d).all() and (d > 0).all()
        assert (k8.float() == 0).all() and (v8.float() == 0).all() and (q8[:, 128:].float() == 0).all()
        assert (kd == 1).all() and (vd == 1).all()
        if scaling == "block":
            assert (qd[:, :, 1] == 1).all()
        _check_dequantised(q, q8, qd, True)
    # tiny values: the descale does not underflow
    q8, _, _, qd, _, _ = quantize_qkv(q * 1e-38, k, v, scaling="head")
    assert torch.isfinite(qd).all() and (qd > 0).all() and torch.isfinite(q8.float()).all()


def test_strided_inputs(path):
    """Inputs in SDPA's memory order (transposed views) quantise as their contiguous copies."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(seqlen_q=70, seqlen_k=70, d=32))
    assert not q.is_contiguous()
    a = quantize_qkv(q, k, v)
    b = quantize_qkv(q.contiguous(), k.contiguous(), v.contiguous())
    for x, y in zip(a, b):
        assert torch.equal(x.float(), y.float())


# --- the Triton kernel against the PyTorch path --------------------------------------------------------------------

@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_and_torch_paths_agree(monkeypatch, scaling, dtype):
    """Bit for bit (fp8 compared as values: the interpreter writes -0.0 as +0.0): both
    rotate in fp32 with exact +-1 products, take the same maxima and divide with
    correct rounding. (On a GPU, 16-bit rows are multiplied on tensor cores, whose
    fp32 sums may round differently: see the gpu test.)"""
    q, k, v = _inputs(nheads=6, nheads_k=2, d=48, d_v=40, seqlen_q=150, seqlen_k=131, dtype=dtype)
    results = {}
    for interp in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        results[interp] = quantize_qkv(q, k, v, scaling=scaling, incoherent=True, seed=11)
    for a, b in zip(results["1"], results["0"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.float(), b.float())


# --- errors --------------------------------------------------------------------------------------------------------

def test_errors():
    q, k, v = _inputs(seqlen_q=8, seqlen_k=8, d=16)
    with pytest.raises(FlashtileTypeError, match="flashtile: q has dtype torch.float8_e4m3fn"):
        quantize_qkv(q.to(torch.float8_e4m3fn), k, v)
    with pytest.raises(FlashtileTypeError, match="flashtile: k has dtype torch.int32"):
        quantize_qkv(q, k.to(torch.int32), v)
    with pytest.raises(FlashtileTypeError, match="one dtype"):
        quantize_qkv(q, k, v.half())
    with pytest.raises(FlashtileTypeError, match="flashtile: v must be a torch.Tensor"):
        quantize_qkv(q, k, None)
    with pytest.raises(FlashtileValueError, match="flashtile: q must be 4-D"):
        quantize_qkv(q[0], k, v)
    with pytest.raises(FlashtileValueError, match="batch size"):
        quantize_qkv(q[:1], k, v)
    with pytest.raises(FlashtileValueError, match="same sequence length"):
        quantize_qkv(q, k, v[:, :5])
    with pytest.raises(FlashtileValueError, match="same number of heads"):
        quantize_qkv(q, k, v[:, :, :1])
    with pytest.raises(FlashtileValueError, match="multiple of the number of key/value heads"):
        quantize_qkv(q[:, :, :3], k, v)
    with pytest.raises(FlashtileValueError, match="q and k must have the same head dim"):
        quantize_qkv(q, k[..., :8], v)
    big = torch.randn(1, 4, 1, 257)
    with pytest.raises(FlashtileValueError, match="head dim must be between 1 and 256"):
        quantize_qkv(big, big, big)
    with pytest.raises(FlashtileValueError, match="flashtile: scaling must be one of"):
        quantize_qkv(q, k, v, scaling="row")
    with pytest.raises(FlashtileTypeError, match="flashtile: incoherent"):
        quantize_qkv(q, k, v, incoherent="yes")
    with pytest.raises(FlashtileTypeError, match="flashtile: seed"):
        quantize_qkv(q, k, v, seed=None)


# --- GPU -----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensor", "head", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 80, 256])
def test_gpu_kernel_against_torch_path(scaling, dtype, d):
    """The compiled kernel against the PyTorch path on the CPU. Descales (maxima of
    fp32 values rotated with exact +-1 products) may differ in the last bits where
    tensor cores (or TF32-free fp32 FMAs) sum in another order, and fp8 values then
    by at most one step of e4m3, at very few places."""
    q, k, v = _inputs(batch=2, nheads=16, nheads_k=4, d=d, seqlen_q=1000, seqlen_k=1531, dtype=dtype,
                      device="cuda")
    gpu = quantize_qkv(q, k, v, scaling=scaling, incoherent=True, seed=2)
    cpu = quantize_qkv(q.cpu(), k.cpu(), v.cpu(), scaling=scaling, incoherent=True, seed=2)
    for a, b in zip(gpu[3:], cpu[3:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=0)
    for a, b in zip(gpu[:3], cpu[:3]):
        a, b = a.cpu().float(), b.float()
        step = torch.maximum(b.abs(), torch.full_like(b, 2.0**-6)) * 2.0**-3 * 1.01  # one e4m3 step
        assert ((a - b).abs() <= step).all()
        assert (a != b).float().mean() < 1e-3
    _check_dequantised(q.cpu(), gpu[0].cpu(), gpu[3].cpu(), True, seed=2)
    _check_dequantised(k.cpu(), gpu[1].cpu(), gpu[4].cpu(), True, seed=2)
    _check_dequantised(v.cpu(), gpu[2].cpu(), gpu[5].cpu(), False)
