"""Batch-invariant mode (``flashtile.set_batch_invariant``): a sequence's output is
bitwise the same alone, in a dense batch, packed among other sequences, and when
decoding whatever the batch or the cache capacity (the number of splits).

On the CPU the kernels run one launch configuration, so the end-to-end tests here
check the kernels' own independence from the batch; which configuration a GPU
would run is checked on the launch table (the choice the mode constrains), and
the GPU tests check the whole."""

import pytest
import torch
from helpers import cu

import flashtile
from flashtile import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashtile.backends.triton.launch import attention as launch_attention
from flashtile.backends.triton.launch import decode as launch_decode
from flashtile.backends.triton.launch.choose import invariant_configs
from flashtile.backends.triton.launch.table import launch_configs


@pytest.fixture
def invariant():
    previous = flashtile.set_batch_invariant(True)
    yield
    flashtile.set_batch_invariant(previous)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("elem_size", [1, 2, 4])
def test_one_config_for_every_forward_launch(capability, head_dim, elem_size):
    """Every forward launch-table name (descriptors or not, causal, window, short rows:
    chosen from the batch's longest rows) runs, in batch-invariant mode, the plain
    forward entry's configs: one key tile and one query tile (a causal mask's masked
    tiles follow the query tile). Without the mode the table's tiles differ between names."""
    firsts = {name: launch_configs(name, head_dim, elem_size, capability)[0]
              for name in launch_attention.FORWARD_NAMES}
    chosen = {name: invariant_configs(head_dim, elem_size, capability) for name in launch_attention.FORWARD_NAMES}
    assert all(configs == chosen["fwd"] for configs in chosen.values())
    assert chosen["fwd"][0] == firsts["fwd"]
    if capability == (9, 0) and head_dim in (64, 128) and elem_size == 2:
        assert len({(c.block_m, c.block_n) for c in firsts.values()}) > 1  # what the mode is for


def test_loads_do_not_follow_the_longest_rows(invariant, monkeypatch):
    """Descriptors or pointer loads: chosen on Hopper from the rows' key count, except in the mode."""
    monkeypatch.setattr(launch_attention, "capability_of", lambda device: (9, 0))
    q, k, v = (torch.randn(1, 256, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    short = launch_attention._forward_features(q, k, v, keys_per_row=8)
    long = launch_attention._forward_features(q, k, v, keys_per_row=1 << 20)
    assert short["KV_DESC"] == long["KV_DESC"]
    flashtile.set_batch_invariant(False)
    assert launch_attention._forward_features(q, k, v, keys_per_row=8)["KV_DESC"] == 0
    assert launch_attention._forward_features(q, k, v, keys_per_row=1 << 20)["KV_DESC"] > 0


def test_mode_switch():
    previous = flashtile.set_batch_invariant(True)
    try:
        assert flashtile.batch_invariant()
        assert flashtile.set_batch_invariant(False) is True
        assert not flashtile.batch_invariant()
        with pytest.raises(TypeError, match="enabled must be a bool"):
            flashtile.set_batch_invariant("yes")
    finally:
        flashtile.set_batch_invariant(previous)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_and_dense(backend, invariant, causal):
    """One sequence (70 queries, 90 keys) alone, in a dense batch, and packed between
    others of every length class: its output is bitwise the same."""
    torch.manual_seed(0)
    h, hk, d = 4, 2, 40
    q = torch.randn(1, 70, h, d, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 90, hk, d, dtype=torch.bfloat16) for _ in range(2))
    alone = flash_attn_func(q, k, v, causal=causal)
    batch_q = torch.cat([torch.randn_like(q), q, torch.randn_like(q)])
    batch_k, batch_v = (torch.cat([torch.randn_like(t), t, torch.randn_like(t)]) for t in (k, v))
    assert torch.equal(flash_attn_func(batch_q, batch_k, batch_v, causal=causal)[1], alone[0])
    for before, after in (([], [(200, 250)]), ([(3, 1), (130, 40)], [(0, 7)]), ([(1, 300)], [])):
        lens_q = [n for n, _ in before] + [70] + [n for n, _ in after]
        lens_k = [n for _, n in before] + [90] + [n for _, n in after]
        parts_q = [torch.randn(n, h, d, dtype=torch.bfloat16) for n, _ in before] + [q[0]] + \
                  [torch.randn(n, h, d, dtype=torch.bfloat16) for n, _ in after]
        parts_k = [torch.randn(n, hk, d, dtype=torch.bfloat16) for _, n in before] + [k[0]] + \
                  [torch.randn(n, hk, d, dtype=torch.bfloat16) for _, n in after]
        parts_v = [torch.randn(n, hk, d, dtype=torch.bfloat16) for _, n in before] + [v[0]] + \
                  [torch.randn(n, hk, d, dtype=torch.bfloat16) for _, n in after]
        out = flash_attn_varlen_func(torch.cat(parts_q), torch.cat(parts_k), torch.cat(parts_v), cu(lens_q),
                                     cu(lens_k), max(lens_q), max(lens_k), causal=causal)
        start = sum(n for n, _ in before)
        assert torch.equal(out[start:start + 70], alone[0]), (before, after)


def test_decoding_whatever_the_splits(backend, invariant, monkeypatch):
    """One sequence decoded alone from a small cache and in batches whose caches hold more
    keys (more splits of SPLIT_KEYS keys, shrunk here so that the interpreter runs several):
    bitwise the same output."""
    monkeypatch.setattr(launch_decode, "SPLIT_KEYS", 64)
    torch.manual_seed(1)
    h, hk, d, n = 4, 2, 32, 150
    q = torch.randn(1, 1, h, d, dtype=torch.float16)
    k_seq, v_seq = (torch.randn(n, hk, d, dtype=torch.float16) for _ in range(2))
    results = []
    for batch, capacity, row in ((1, 160, 0), (3, 320, 1), (5, 520, 4)):
        k_cache = torch.randn(batch, capacity, hk, d, dtype=torch.float16)
        v_cache = torch.randn(batch, capacity, hk, d, dtype=torch.float16)
        k_cache[row, :n], v_cache[row, :n] = k_seq, v_seq
        qs = torch.randn(batch, 1, h, d, dtype=torch.float16)
        qs[row] = q[0]
        lengths = torch.randint(1, capacity, (batch,), dtype=torch.int32)
        lengths[row] = n
        out, lse = flash_attn_with_kvcache(qs, k_cache, v_cache, cache_seqlens=lengths, causal=True,
                                           return_softmax_lse=True)
        results.append((out[row], lse[row]))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_num_splits_refused(invariant):
    q = torch.randn(1, 1, 2, 16)
    cache = torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match="num_splits must be 0 in batch-invariant mode"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([20], dtype=torch.int32), num_splits=2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_forward(invariant, head_dim, causal):
    """A sequence of 1000 keys alone and packed with one of 9000 (which moves the launch to
    the long-row entries and descriptors): bitwise the same."""
    torch.manual_seed(2)
    h, hk = 16, 4
    q, k, v = (torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16)
               for n, heads in ((900, h), (1000, hk), (1000, hk)))
    alone = flash_attn_func(q[None], k[None], v[None], causal=causal)[0]
    big_q, big_k, big_v = (torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                           for n, heads in ((8000, h), (9000, hk), (9000, hk)))
    out = flash_attn_varlen_func(torch.cat([big_q, q]), torch.cat([big_k, k]), torch.cat([big_v, v]),
                                 cu([8000, 900]).cuda(), cu([9000, 1000]).cuda(), 8000, 9000, causal=causal)
    assert torch.equal(out[8000:], alone)


@pytest.mark.gpu
def test_gpu_decoding(invariant):
    torch.manual_seed(3)
    h, hk, d, n = 32, 8, 128, 5000
    q = torch.randn(1, 1, h, d, device="cuda", dtype=torch.bfloat16)
    k_seq, v_seq = (torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    results = []
    for batch, capacity in ((1, 8192), (16, 40000)):
        k_cache, v_cache = (torch.randn(batch, capacity, hk, d, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2))
        k_cache[-1, :n], v_cache[-1, :n] = k_seq, v_seq
        qs = torch.randn(batch, 1, h, d, device="cuda", dtype=torch.bfloat16)
        qs[-1] = q[0]
        lengths = torch.randint(1, capacity, (batch,), dtype=torch.int32, device="cuda")
        lengths[-1] = n
        results.append(flash_attn_with_kvcache(qs, k_cache, v_cache, cache_seqlens=lengths)[-1])
    assert torch.equal(results[0], results[1])
