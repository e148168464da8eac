"""flashtile.nn.MultiheadAttention with context_parallel_group: each rank's shard
through the module against the same module over the whole sequence on one
process (itself tested against the oracle in tests/nn)."""

import copy

import pytest
import torch
import torch.distributed as dist
from cluster import device, group, set_backend_env

from flashtile.distributed import gather_sequence, shard
from flashtile.nn import MultiheadAttention


def mha_case(seed, layout, method, rotary_emb_dim, num_heads_kv):
    set_backend_env(False)
    torch.manual_seed(seed)  # the same weights and inputs on every rank
    rank, world_size = dist.get_rank(group()), dist.get_world_size(group())
    whole = MultiheadAttention(64, 4, num_heads_kv=num_heads_kv, causal=True, rotary_emb_dim=rotary_emb_dim,
                               device=device())
    parallel = copy.deepcopy(whole)
    parallel.context_parallel_group = group()
    parallel.context_parallel_layout, parallel.context_parallel_method = layout, method
    x = torch.randn(2, 12 * world_size, 64, device=device(), requires_grad=True)
    dout = torch.randn_like(x)
    expected = whole(x)
    expected.backward(dout)

    x_local = shard(x.detach(), 1, rank, world_size, layout).requires_grad_()
    out_local = parallel(x_local)
    out_local.backward(shard(dout, 1, rank, world_size, layout))
    torch.testing.assert_close(gather_sequence(out_local.detach(), 1, group(), layout), expected,
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gather_sequence(x_local.grad, 1, group(), layout), x.grad, atol=2e-5, rtol=1e-4)
    for (name, p_whole), p_parallel in zip(whole.named_parameters(), parallel.parameters()):
        grad = p_parallel.grad.clone()
        dist.all_reduce(grad, group=group())  # each rank's weight gradient is its shard's part
        torch.testing.assert_close(grad, p_whole.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout, method, rotary_emb_dim, num_heads_kv", [
    ("zigzag", "ring", 16, 2),
    ("contiguous", "ring", 0, 4),
    ("zigzag", "ulysses", 8, 1),
])
def test_mha_context_parallel_matches_whole_sequence(ranks, layout, method, rotary_emb_dim, num_heads_kv):
    world_size = 2 if method == "ulysses" else 3
    ranks.run(world_size, mha_case, seed=int(torch.randint(0, 2**31 - 1, ())), layout=layout, method=method,
             rotary_emb_dim=rotary_emb_dim, num_heads_kv=num_heads_kv)


def test_mha_context_parallel_arguments():
    with pytest.raises(ValueError, match="context_parallel_method"):
        MultiheadAttention(64, 4, context_parallel_method="tree")
    with pytest.raises(ValueError, match="context_parallel_layout"):
        MultiheadAttention(64, 4, context_parallel_layout="striped")
    with pytest.raises(NotImplementedError, match="cross_attn"):
        MultiheadAttention(64, 4, cross_attn=True, context_parallel_group=object())
