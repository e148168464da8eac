"""A larger grid on a CUDA GPU with the compiled kernels (marker ``gpu``).

Run with ``FLASHTILE_TEST_GPU=1 pytest -m gpu`` on a machine with a GPU.
"""

import pytest
import torch

from flashtile import flash_attn_func, scaled_dot_product_attention
from helpers import check_attention

pytestmark = pytest.mark.gpu

HEAD_DIMS = [32, 59, 64, 96, 128, 192, 256]
SEQLENS = [(1, 4096), (4096, 4096), (1000, 3001), (2048, 512), (113, 203)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=str)
def test_flash_attn_gpu(dtype, causal, head_dim, seqlens):
    seqlen_q, seqlen_k = seqlens
    h, hk = 4, 2
    q = torch.randn(2, seqlen_q, h, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, seqlen_k, hk, head_dim, device="cuda", dtype=dtype)
    check_attention(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gpu_matches_torch(causal):
    q = torch.randn(4, 8, 1500, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(4, 2, 1700, 128, device="cuda", dtype=torch.bfloat16)
    out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                           enable_gqa=True)
    low = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert (out.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-2


def test_deterministic_backward_gpu():
    q, k, v = (torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_long_sequence_memory_linear_gpu():
    # 64k tokens would need 16 GiB for one head's fp32 score matrix; here it must fit in a few MiB
    q, k, v = (torch.randn(1, 65536, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16 * q.numel() * q.element_size()
    assert torch.isfinite(q.grad).all()
