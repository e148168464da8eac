"""The tiled PyTorch path (what CPU tensors use outside the interpreter)."""

import pytest
import torch
from helpers import check_attention

import flashtile
from flashtile.backends.torch_tiled import attention_tiled_backward, attention_tiled_forward
from flashtile.options import AttnOptions


@pytest.fixture
def tiled_path(monkeypatch):
    """CPU tensors take the tiled PyTorch path: Triton's interpreter off, and PyTorch's
    fused kernel (which serves dense, windowed and masked calls otherwise) out of the way."""
    from flashtile.backends import torch_fused

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch_fused, "fused_mode", lambda *args, **kwargs: None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 77, 4, 2, 40), (300, 203, 4, 1, 59), (128, 600, 2, 2, 96)], ids=str)
def test_tiled_api_matches_oracle(tiled_path, dtype, causal, shape):
    seqlen_q, seqlen_k, h, hk, d = shape
    q = torch.randn(2, seqlen_q, h, d, dtype=dtype)
    k = torch.randn(2, seqlen_k, hk, d, dtype=dtype)
    v = torch.randn(2, seqlen_k, hk, d, dtype=dtype)
    check_attention(lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=causal), q, k, v, causal=causal)


def test_tiled_sdpa_layout(tiled_path):
    q, k, v = torch.randn(2, 3, 130, 32), torch.randn(2, 3, 260, 32), torch.randn(2, 3, 260, 32)
    out = flashtile.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("features", ["causal", "everything"])
def test_tile_size_does_not_change_result(features):
    q, k, v = torch.randn(1, 150, 2, 16), torch.randn(1, 170, 2, 16), torch.randn(1, 170, 2, 16)
    opts = AttnOptions(0.25, diag_offset=20, window_right=0)
    if features == "everything":
        opts = opts._replace(window_left=30, softcap=3.0, alibi=torch.rand(1, 2), bias=torch.randn(1, 2, 150, 170),
                             dropout_p=0.2, seed=5)
    o1, l1 = attention_tiled_forward(q, k, v, opts, block_m=16, block_n=32)
    o2, l2 = attention_tiled_forward(q, k, v, opts, block_m=150, block_n=170)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)
    dout = torch.randn_like(o1)
    bias_grad = opts.bias is not None
    g1 = attention_tiled_backward(dout, q, k, v, o1, l1, opts, bias_grad, block_m=16, block_n=32)
    g2 = attention_tiled_backward(dout, q, k, v, o2, l2, opts, bias_grad, block_m=150, block_n=170)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_tiled_memory_is_linear(tiled_path):
    # an 8k x 8k fp32 score matrix per head would be 256 MiB; the tiled path must stay far below
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(1, 8192, 1, 32) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        flashtile.flash_attn_func(q, k, v)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < largest < 64 * 2**20, f"an op allocated {largest / 2**20:.0f} MiB"
