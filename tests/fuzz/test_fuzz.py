"""Property-based tests: random shapes, dtypes and options of flash_attn_func and
flash_attn_varlen_func against the oracle, with the accuracy rule; hypothesis
shrinks a failure to a minimal case.

A bounded profile runs in CI on the CPU: the CPU paths (PyTorch's fused kernel
and the tiled path) and, at small sizes, the Triton kernels under the
interpreter. ``FLASHTILE_FUZZ_EXAMPLES`` sets the number of cases (e.g. thousands
for the long profile on a GPU, with ``FLASHTILE_TEST_GPU=1 pytest -m gpu``)."""

import os

import pytest
import torch
from helpers import check_attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashtile
from flashtile.testing import attention_ref

EXAMPLES = int(os.environ.get("FLASHTILE_FUZZ_EXAMPLES", "0"))
def fuzz(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize=True, database=None)


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
    return case


def _inputs(case, device):
    b, sq, sk, hk = case["batch"], case["seqlen_q"], case["seqlen_k"], case["nheads_k"]
    h, d, dtype = hk * case["group"], case["head_dim"], case["dtype"]
    if case["sliced"]:  # strided views: every other head of a wider tensor, as packed projections give
        q = torch.randn(b, sq, 2 * h, d, device=device).to(dtype)[:, :, ::2]
        k = torch.randn(b, sk, 2 * hk, d, device=device).to(dtype)[:, :, 1::2]
        v = torch.randn(b, sk, 2 * hk, d, device=device).to(dtype)[:, :, ::2]
    else:
        q, k, v = (torch.randn(b, s, n, d, device=device).to(dtype) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    return q, k, v


def _check_dense(case, device="cpu"):
    q, k, v = _inputs(case, device)
    h = q.shape[2]
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    if case["alibi"]:
        kw["alibi_slopes"] = torch.rand(h, device=device) * 0.3
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, **kw), q, k, v, **kw)


def _check_varlen(case, lengths, device="cpu"):
    b = len(lengths)
    h, hk, d, dtype = case["nheads_k"] * case["group"], case["nheads_k"], case["head_dim"], case["dtype"]
    total_q, total_k = sum(n for n, _ in lengths), sum(n for _, n in lengths)
    q = torch.randn(total_q, h, d, device=device).to(dtype)
    k, v = (torch.randn(total_k, hk, d, device=device).to(dtype) for _ in range(2))
    cu_q = torch.tensor([0] + [sum(n for n, _ in lengths[:i + 1]) for i in range(b)], dtype=torch.int32,
                        device=device)
    cu_k = torch.tensor([0] + [sum(n for _, n in lengths[:i + 1]) for i in range(b)], dtype=torch.int32,
                        device=device)
    kw = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"])
    max_q, max_k = max([n for n, _ in lengths] + [0]), max([n for _, n in lengths] + [0])

    def fn(q, k, v):
        return flashtile.flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, **kw)[None]

    def ref(q, k, v, **ref_kw):
        parts = []
        for i in range(b):
            qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            parts.append(attention_ref(q[:, qs], k[:, ks], v[:, ks], **kw, **ref_kw))
        return torch.cat(parts, dim=1) if parts else q.new_zeros(q.shape)

    check_attention(fn, q[None], k[None], v[None], ref_fn=ref)


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


@pytest.mark.gpu
@fuzz(200)
@given(case=cases(2000, list(range(1, 257)), [torch.float16, torch.bfloat16]))
def test_fuzz_gpu(case):
    _check_dense(case, "cuda")


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
