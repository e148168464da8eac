"""Bad input gets a clear Python exception naming the argument."""

import pytest
import torch

from flashtile import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    scaled_dot_product_attention,
)


def qkv(b=1, sq=8, sk=8, h=2, hk=2, d=16, dtype=torch.float16):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: (qkv()[0].int(), *qkv()[1:]), TypeError, "q has dtype torch.int32"),
    (lambda: (qkv()[0].double(), *qkv()[1:]), TypeError, "float16, bfloat16 and float32"),
    (lambda: (qkv()[0].float(), *qkv()[1:]), TypeError, "share one dtype"),
    (lambda: ("q", *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
    (lambda: (qkv()[0][0], *qkv()[1:]), ValueError, "q must be 4-D"),
    (lambda: (qkv()[0], qkv(b=2)[1], qkv()[2]), ValueError, "batch size"),
    (lambda: (qkv()[0], qkv(sk=9)[1], qkv()[2]), ValueError, "same sequence length"),
    (lambda: (qkv()[0], qkv(hk=1)[1], qkv()[2]), ValueError, "same number of heads"),
    (lambda: qkv(h=3, hk=2), ValueError, r"multiple of the number of key/value heads"),
    (lambda: (qkv()[0], qkv(d=32)[1], qkv()[2]), ValueError, "q and k must have the same head dim"),
    (lambda: (*qkv()[:2], qkv(d=320)[2]), ValueError, "v's head dim must be between 1 and 256"),
    (lambda: qkv(d=320), ValueError, "head dim must be between 1 and 256"),
    (lambda: qkv(h=0, hk=0), ValueError, "number of heads must be positive"),
])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_func(*make())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dropout_p=1.5), ValueError, "dropout_p must be a float in"),
    (dict(window_size=(4, 0, 1)), ValueError, "window_size must be a pair"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a float"),
    (dict(alibi_slopes=torch.ones(2, 2, 1)), ValueError, "alibi_slopes must have shape"),
    (dict(softmax_scale="big"), TypeError, "softmax_scale must be a float"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_func(*qkv(), **kwargs)


def test_packed_shapes():
    with pytest.raises(ValueError, match="qkv must be"):
        flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 2, 16))
    with pytest.raises(ValueError, match="kv must be"):
        flash_attn_kvpacked_func(qkv()[0], torch.randn(1, 8, 3, 2, 16))


def test_features_of_later_releases_say_so():
    # the backward pass through a paged cache is not built
    q, _, _ = qkv()
    pages = torch.zeros(4, 16, 2, 16, dtype=q.dtype)
    with pytest.raises(NotImplementedError, match="backward pass through a paged KV cache"):
        flash_attn_varlen_func(q[0].requires_grad_(), pages, pages, torch.tensor([0, 8], dtype=torch.int32),
                               torch.tensor([0, 8], dtype=torch.int32), 8, 8,
                               block_table=torch.zeros(1, 1, dtype=torch.int32))


def test_sdpa_arguments():
    q, k, v = (t.transpose(1, 2) for t in qkv(h=4, hk=2))
    with pytest.raises(ValueError, match="enable_gqa=True"):
        scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attn_mask is on"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool, device="meta"),
                                     enable_gqa=True)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="scale must be a float"):
        scaled_dot_product_attention(q, k, v, scale=[1.0], enable_gqa=True)


def test_unsupported_device():
    q, k, v = (t.to("meta") for t in qkv())
    with pytest.raises(NotImplementedError, match="device 'meta'"):
        flash_attn_func(q, k, v)


def test_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        flash_attn_func(q.cuda(), k, v)
