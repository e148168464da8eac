"""merge_attention_states: attention over parts of the keys, merged, equals
attention over all of them."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashtile import flash_attn_varlen_func, merge_attention_states
from flashtile.testing import attention_ref


@pytest.fixture(autouse=True)
def tiled_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # only the merge is under test here


def ref_with_lse(q, k, v):
    out, lse = attention_ref(q.double(), k.double(), v.double(), return_lse=True)
    return out, lse.double()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 2), seqlen_q=st.integers(1, 20), cuts=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       nheads=st.integers(1, 3), head_dim=st.integers(1, 16))
def test_merging_parts_equals_attention_over_all_keys(batch, seqlen_q, cuts, nheads, head_dim):
    bounds = [0] + sorted(cuts) + [45]  # parts may be empty: their LSE is -inf
    q = torch.randn(batch, seqlen_q, nheads, head_dim, dtype=torch.float64)
    k, v = (torch.randn(batch, 45, nheads, head_dim, dtype=torch.float64) for _ in range(2))
    parts = [ref_with_lse(q, k[:, a:b], v[:, a:b]) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_attention_states(parts)
    full_out, full_lse = ref_with_lse(q, k, v)
    torch.testing.assert_close(out.double(), full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), full_lse, atol=1e-5, rtol=1e-5)


def test_pairwise_form_varlen_layout_and_empty_rows():
    lens = [5, 9]
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    q = torch.randn(14, 2, 8)
    k, v = torch.randn(14, 2, 8), torch.randn(14, 2, 8)
    # keys of each sequence split in two halves: first halves, second halves as their own varlen batches
    first = torch.cat([k[0:2], k[5:9]]), torch.cat([v[0:2], v[5:9]])
    second = torch.cat([k[2:5], k[9:14]]), torch.cat([v[2:5], v[9:14]])
    cu_first, cu_second = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 3, 8], dtype=torch.int32)
    out_a, lse_a, _ = flash_attn_varlen_func(q, *first, cu, cu_first, 9, 4, return_attn_probs=True)
    out_b, lse_b, _ = flash_attn_varlen_func(q, *second, cu, cu_second, 9, 5, return_attn_probs=True)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    full, full_lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, return_attn_probs=True)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    # a row that saw nothing anywhere stays zero / -inf
    empty = torch.full_like(lse_a, float("-inf"))
    out, lse = merge_attention_states(torch.zeros_like(out_a), empty, torch.zeros_like(out_b), empty)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_bad_arguments():
    out, lse = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="lse\\[1\\] must have shape"):
        merge_attention_states(out, lse, out, lse.transpose(1, 2))
    with pytest.raises(TypeError, match="takes"):
        merge_attention_states(out, lse, out)
