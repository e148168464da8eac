"""Property-based tests: random shapes, dtypes and options of flash_attn_func,
flash_attn_varlen_func and flash_attn_with_kvcache against the oracle, with the
accuracy rule; hypothesis shrinks a failure to a minimal case.

A bounded profile runs in CI on the CPU: the CPU paths (PyTorch's fused kernel
and the tiled path) and, at small sizes, the Triton kernels under the
interpreter. ``FLASHTILE_FUZZ_EXAMPLES`` sets the number of cases (e.g. thousands
for the long profile on a GPU, with ``FLASHTILE_TEST_GPU=1 pytest -m gpu``)."""

import os
import zlib

import pytest
import torch
from helpers import check_attention, max_err, rounding_floor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import flashtile
from flashtile.testing import attention_ref

EXAMPLES = int(os.environ.get("FLASHTILE_FUZZ_EXAMPLES", "0"))
# FLASHTILE_FUZZ_SHRINK=0 reports a failing case as drawn, without shrinking it (on a GPU each
# shrinking step may compile new kernels: minutes)
SHRINK = os.environ.get("FLASHTILE_FUZZ_SHRINK", "1") != "0"


def fuzz(examples: int):
    phases = [p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)]
    return settings(max_examples=EXAMPLES or examples, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True, database=None, phases=phases)


@st.composite
def cases(draw, max_seqlen: int, head_dims, dtypes):
    group = draw(st.integers(1, 3))
    case = dict(
        batch=draw(st.integers(0, 3)), seqlen_q=draw(st.integers(0, max_seqlen)),
        seqlen_k=draw(st.integers(0, max_seqlen)), nheads_k=draw(st.integers(1, 2)), group=group,
        head_dim=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.booleans()), sliced=draw(st.booleans()))
    window = draw(st.sampled_from(["none", "left", "both"]))
    case["window"] = {"none": (-1, -1), "left": (draw(st.integers(0, 40)), -1),
                      "both": (draw(st.integers(0, 40)), draw(st.integers(0, 40)))}[window]
    case["softcap"] = draw(st.sampled_from([0.0, 0.0, 5.0, 30.0]))
    case["alibi"] = draw(st.booleans())
    case["sinks"] = draw(st.booleans())
    # a value head dim of its own, now and then
    case["head_dim_v"] = draw(st.sampled_from([case["head_dim"]] * 3 + list(head_dims)))
    return case


def _seeded(check):
    """``check`` with torch's generator seeded from its arguments: a case draws the same
    tensors every time it runs, so that hypothesis can replay and shrink a failure."""
    def run(*args, **kwargs):
        torch.manual_seed(zlib.crc32(repr((args, sorted(kwargs.items()))).encode()))
        return check(*args, **kwargs)
    return run


def _inputs(case, device):
    b, sq, sk, hk = case["batch"], case["seqlen_q"], case["seqlen_k"], case["nheads_k"]
    h, d, dv, dtype = hk * case["group"], case["head_dim"], case["head_dim_v"], case["dtype"]
    if case["sliced"]:  # strided views: every other head of a wider tensor, as packed projections give
        q = torch.randn(b, sq, 2 * h, d, device=device).to(dtype)[:, :, ::2]
        k = torch.randn(b, sk, 2 * hk, d, device=device).to(dtype)[:, :, 1::2]
        v = torch.randn(b, sk, 2 * hk, dv, device=device).to(dtype)[:, :, ::2]
    else:
        q, k, v = (torch.randn(b, s, n, dim, device=device).to(dtype)
                   for s, n, dim in ((sq, h, d), (sk, hk, d), (sk, hk, dv)))
    return q, k, v


def _sinks(case, device):
    """Sink logits of every size (or None), some above the scores."""
    h = case["nheads_k"] * case["group"]
    return (torch.randn(h, device=device) * 4) if case["sinks"] else None


@_seeded
def _check_dense(case, device="cpu"):
    q, k, v = _inputs(case, device)
    h = q.shape[2]
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    if case["alibi"]:
        kw["alibi_slopes"] = torch.rand(h, device=device) * 0.3
    check_attention(lambda q, k, v, **s: flashtile.flash_attn_func(q, k, v, **kw, **s), q, k, v,
                    sinks=_sinks(case, device), **kw)


@_seeded
def _check_varlen(case, lengths, device="cpu"):
    b = len(lengths)
    h, hk, d, dtype = case["nheads_k"] * case["group"], case["nheads_k"], case["head_dim"], case["dtype"]
    total_q, total_k = sum(n for n, _ in lengths), sum(n for _, n in lengths)
    q = torch.randn(total_q, h, d, device=device).to(dtype)
    k = torch.randn(total_k, hk, d, device=device).to(dtype)
    v = torch.randn(total_k, hk, case["head_dim_v"], device=device).to(dtype)
    cu_q = torch.tensor([0] + [sum(n for n, _ in lengths[:i + 1]) for i in range(b)], dtype=torch.int32,
                        device=device)
    cu_k = torch.tensor([0] + [sum(n for _, n in lengths[:i + 1]) for i in range(b)], dtype=torch.int32,
                        device=device)
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    max_q, max_k = max([n for n, _ in lengths] + [0]), max([n for _, n in lengths] + [0])

    def fn(q, k, v, **s):
        return flashtile.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, **kw, **s)[None]

    def ref(q, k, v, **ref_kw):
        parts = []
        for i in range(b):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            parts.append(attention_ref(q[:, qs], k[:, ks], v[:, ks], **kw, **ref_kw))
        return torch.cat(parts, dim=1) if parts else q.new_zeros(*q.shape[:-1], v.shape[-1])

    check_attention(fn, q[None], k[None], v[None], ref_fn=ref, sinks=_sinks(case, device))


@_seeded
def _check_kvcache(case, draw_lengths, paged_page, num_splits, seqlen_new, device="cpu"):
    """flash_attn_with_kvcache appending ``seqlen_new`` tokens to caches of random
    lengths (contiguous, or paged with pages of ``paged_page`` keys, shuffled), inference
    only, against the oracle per sequence."""
    b = max(case["batch"], 1)
    h, hk, d, dv, dtype = (case["nheads_k"] * case["group"], case["nheads_k"], case["head_dim"],
                           case["head_dim_v"], case["dtype"])
    capacity = max(draw_lengths) + seqlen_new + 1
    if paged_page:
        capacity = -(-capacity // paged_page) * paged_page
    k_cache = torch.randn(b, capacity, hk, d, device=device).to(dtype)
    v_cache = torch.randn(b, capacity, hk, dv, device=device).to(dtype)
    lengths = torch.tensor(draw_lengths[:b] + [0] * (b - len(draw_lengths[:b])), dtype=torch.int32, device=device)
    q = torch.randn(b, max(case["seqlen_q"], 1), h, d, device=device).to(dtype)
    k_new = torch.randn(b, seqlen_new, hk, d, device=device).to(dtype)
    v_new = torch.randn(b, seqlen_new, hk, dv, device=device).to(dtype)
    keys, values = k_cache.clone(), v_cache.clone()
    for i in range(b):
        n = int(lengths[i])
        keys[i, n:n + seqlen_new], values[i, n:n + seqlen_new] = k_new[i], v_new[i]
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    sinks = _sinks(case, device)
    args = dict(k=k_new if seqlen_new else None, v=v_new if seqlen_new else None, cache_seqlens=lengths,
                num_splits=num_splits, sinks=sinks, **kw)
    if paged_page:
        pages = capacity // paged_page
        table = torch.randperm(b * pages, device=device).reshape(b, pages).to(torch.int32)
        k_pages = torch.empty(b * pages, paged_page, hk, d, device=device, dtype=dtype)
        v_pages = torch.empty(b * pages, paged_page, hk, dv, device=device, dtype=dtype)
        k_pages[table.flatten().long()] = k_cache.reshape(b * pages, paged_page, hk, d)
        v_pages[table.flatten().long()] = v_cache.reshape(b * pages, paged_page, hk, dv)
        out = flashtile.flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table, **args)
    else:
        out = flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, **args)
    for i in range(b):
        n = int(lengths[i]) + seqlen_new
        ref_args = (q[i:i + 1], keys[i:i + 1, :n], values[i:i + 1, :n])
        ref = attention_ref(*ref_args, sinks=sinks, compute_dtype=torch.float64, **kw)
        low = attention_ref(*ref_args, sinks=sinks, upcast=False, **kw)
        err, base = max_err(out[i:i + 1], ref), max_err(low, ref)
        assert err <= 2 * base + rounding_floor(ref, dtype), f"sequence {i}: error {err:.3e} vs pytorch {base:.3e}"


@_seeded
def _check_fp8(case, scaling, incoherent, device="cpu"):
    """FP8 forward of quantised inputs against fp64 attention of the dequantised ones: within
    the e4m3 rounding of P (2**-4 of the largest |v|) and the output dtype's rounding."""
    from flashtile.fp8 import quantize_qkv
    from flashtile.ops.fp8 import dequantize

    q, k, v = _inputs(case, device)
    h = q.shape[2]
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    if case["alibi"]:
        kw["alibi_slopes"] = torch.rand(h, device=device) * 0.3
    sinks = _sinks(case, device)
    q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling=scaling, incoherent=incoherent)
    out = flashtile.flash_attn_func(q8, k8, v8, sinks=sinks, q_descale=qd, k_descale=kd, v_descale=vd,
                                    out_dtype=case["dtype"], **kw)
    assert out.dtype == case["dtype"] and out.shape == (*q.shape[:3], v.shape[-1])
    if out.numel() == 0:
        return
    qf, kf, vf = (dequantize(t, d).double() for t, d in ((q8, qd), (k8, kd), (v8, vd)))
    ref = attention_ref(qf, kf, vf, sinks=sinks, softmax_scale=case["head_dim"] ** -0.5, **kw)
    vmax = vf.abs().amax().item() if vf.numel() else 0.0
    bound = 2.0**-4 * vmax + 2 * torch.finfo(case["dtype"]).eps * ref.abs().amax().item() + 1e-6
    assert out.isfinite().all()
    assert max_err(out, ref) <= 1.25 * bound, f"error {max_err(out, ref):.3e} above the e4m3 bound {bound:.3e}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@fuzz(40)
@given(case=cases(300, [1, 7, 16, 40, 64, 96, 128, 200, 256], DTYPES))
def test_fuzz_cpu_paths(case, monkeypatch_env):
    monkeypatch_env("0")  # CPU tensors: PyTorch's fused kernel and the tiled path
    _check_dense(case)


@fuzz(12)
@given(case=cases(70, [1, 16, 40, 64], DTYPES))
def test_fuzz_triton_interpreter(case, monkeypatch_env):
    monkeypatch_env("1")  # the Triton kernels themselves, small sizes
    _check_dense(case)


@fuzz(25)
@given(case=cases(1, [16, 64, 128], [torch.float32, torch.bfloat16]),
       lengths=st.lists(st.tuples(st.integers(0, 120), st.integers(0, 120)), min_size=1, max_size=4))
def test_fuzz_varlen_cpu(case, lengths, monkeypatch_env):
    monkeypatch_env("0")
    _check_varlen(case, lengths)


@fuzz(25)
@given(case=cases(6, [16, 40, 64, 128], DTYPES), lengths=st.lists(st.integers(0, 200), min_size=1, max_size=3),
       page=st.sampled_from([0, 0, 1, 5, 16, 64]), num_splits=st.integers(0, 4), seqlen_new=st.integers(0, 4),
       interpret=st.booleans())
def test_fuzz_kvcache(case, lengths, page, num_splits, seqlen_new, interpret, monkeypatch_env):
    monkeypatch_env("1" if interpret else "0")  # the split kernels under the interpreter, or the tiled path
    _check_kvcache(case, lengths, page, num_splits, seqlen_new)


@fuzz(15)
@given(case=cases(70, [1, 16, 40, 64], DTYPES), scaling=st.sampled_from(["tensor", "head", "block"]),
       incoherent=st.booleans(), interpret=st.booleans())
def test_fuzz_fp8(case, scaling, incoherent, interpret, monkeypatch_env):
    monkeypatch_env("1" if interpret else "0")  # the FP8 kernel under the interpreter, or the tiled path
    _check_fp8(case, scaling, incoherent)


@pytest.mark.gpu
@fuzz(200)
@given(case=cases(2000, list(range(1, 257)), [torch.float16, torch.bfloat16]))
def test_fuzz_gpu(case):
    _check_dense(case, "cuda")


@pytest.mark.gpu
@fuzz(100)
@given(case=cases(3000, list(range(1, 257)), [torch.float16, torch.bfloat16]),
       scaling=st.sampled_from(["tensor", "head", "block"]), incoherent=st.booleans())
def test_fuzz_fp8_gpu(case, scaling, incoherent):
    _check_fp8(case, scaling, incoherent, "cuda")


@pytest.mark.gpu
@fuzz(100)
@given(case=cases(16, [64, 128, 192, 256], [torch.float16, torch.bfloat16]),
       lengths=st.lists(st.integers(0, 5000), min_size=1, max_size=4), page=st.sampled_from([0, 16, 64, 256]),
       num_splits=st.integers(0, 8), seqlen_new=st.integers(0, 8))
def test_fuzz_kvcache_gpu(case, lengths, page, num_splits, seqlen_new):
    _check_kvcache(case, lengths, page, num_splits, seqlen_new, "cuda")


@pytest.fixture
def monkeypatch_env():
    """Set TRITON_INTERPRET for one example (hypothesis runs many examples in one test)."""
    saved = os.environ.get("TRITON_INTERPRET")

    def set_to(value):
        os.environ["TRITON_INTERPRET"] = value

    yield set_to
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
