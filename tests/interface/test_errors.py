"""Errors that both Python's convention and flash_attn users' code catch: a
TypeError/ValueError that is also a RuntimeError, naming the argument
flash_attn's message names."""

import pytest
import torch

import flashtile


def test_bad_input_is_also_runtime_error():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="heads"):  # shape: a ValueError
        flashtile.flash_attn_func(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError):
        flashtile.flash_attn_func(q, torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16))
    with pytest.raises(RuntimeError):  # dtype: a TypeError
        flashtile.flash_attn_func(q, q.double(), q.double())
    with pytest.raises(TypeError):
        flashtile.flash_attn_func(q, q.double(), q.double())


def test_paged_cache_bounds_name_block_table():
    k_cache = torch.zeros(4, 16, 1, 16)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(RuntimeError, match="block_table"):
        flashtile.flash_attn_with_kvcache(q, k_cache, torch.zeros_like(k_cache), q, q, block_table=table,
                                          cache_seqlens=torch.tensor([64], dtype=torch.int32))
