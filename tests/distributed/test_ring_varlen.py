"""Ring attention over packed documents (ring_flash_attn_varlen_func) on CPU
processes joined by gloo, against the oracle per document over the whole
batch, forward and gradients."""

import pytest
import torch
import torch.distributed as dist
from cluster import device, group
from helpers import check_attention, cu, packed_ref

from flashtile.distributed import (
    ring_flash_attn_varlen_func,
    varlen_shard,
    varlen_unshard,
)


class _ScatterDocuments(torch.autograd.Function):
    """The whole packed batch (the same on every rank) -> this rank's share of each
    document; the gradient is gathered from every rank."""

    @staticmethod
    def forward(ctx, x, cu_seqlens, layout):
        ctx.cu_seqlens, ctx.layout = cu_seqlens, layout
        return varlen_shard(x, cu_seqlens, dist.get_rank(group()), dist.get_world_size(group()), layout)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.cu_seqlens, ctx.layout), None, None


class _GatherDocuments(torch.autograd.Function):
    """This rank's shard -> the whole packed batch on every rank."""

    @staticmethod
    def forward(ctx, x, cu_seqlens, layout):
        ctx.cu_seqlens, ctx.layout = cu_seqlens, layout
        return _gather(x, cu_seqlens, layout)

    @staticmethod
    def backward(ctx, grad):
        return varlen_shard(grad, ctx.cu_seqlens, dist.get_rank(group()), dist.get_world_size(group()),
                            ctx.layout), None, None


def _gather(x, cu_seqlens, layout):
    x = x.contiguous()
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group()))]
    dist.all_gather(shards, x, group=group())
    return varlen_unshard(shards, cu_seqlens, layout)


def varlen_case(seed, layout, causal, dtype, nheads, nheads_k, headdim, lengths, interpret=False, alibi=None,
                **options):
    """``alibi``: None, "heads" (slopes (nheads,)) or "documents" (slopes (ndocs, nheads))."""
    from cluster import set_backend_env

    set_backend_env(interpret)
    torch.manual_seed(seed)  # the same whole batch on every rank
    cu_seqlens = cu(lengths)
    total = sum(lengths)
    q = torch.randn(total, nheads, headdim, dtype=dtype, device=device())
    k, v = (torch.randn(total, nheads_k, headdim, dtype=dtype, device=device()) for _ in range(2))
    slopes = None
    if alibi is not None:
        slopes = torch.rand(nheads if alibi == "heads" else (len(lengths), nheads), device=device())
        options["alibi_slopes"] = slopes

    def ring(q, k, v):
        shards = (_ScatterDocuments.apply(t, cu_seqlens, layout) for t in (q, k, v))
        out = ring_flash_attn_varlen_func(*shards, cu_seqlens.to(device()), max(lengths), group(), causal=causal,
                                          layout=layout, **options)
        return _GatherDocuments.apply(out, cu_seqlens, layout)

    ref_options = {name: value for name, value in options.items() if name != "alibi_slopes"}
    check_attention(ring, q, k, v, ref_fn=packed_ref(lengths, lengths, alibi_slopes=slopes), causal=causal,
                    **ref_options)


# (world_size, layout, causal, dtype, nheads, nheads_k, document lengths, options, interpret)
CASES = [
    (2, "zigzag", True, torch.float32, 4, 2, [12, 4, 20], {}, False),
    (2, "zigzag", False, torch.bfloat16, 2, 1, [8, 16], {}, False),
    (2, "contiguous", True, torch.bfloat16, 2, 2, [6, 10, 2], {}, False),
    (2, "contiguous", False, torch.float32, 4, 1, [14, 4], {"softcap": 1.5}, False),
    (4, "zigzag", True, torch.float32, 4, 2, [16, 8, 24], {}, False),
    (4, "zigzag", True, torch.bfloat16, 2, 1, [8, 0, 32], {}, False),
    (4, "contiguous", True, torch.float32, 2, 2, [12, 4, 8], {}, False),
    (4, "contiguous", False, torch.float32, 2, 1, [8, 20], {}, False),
    (2, "zigzag", True, torch.float32, 2, 1, [20, 12], {"window_size": (5, 0)}, False),
    (4, "contiguous", False, torch.float32, 2, 2, [16, 24], {"window_size": (3, 6)}, False),
    (2, "zigzag", True, torch.float32, 2, 1, [12, 4, 8], {}, True),
    (2, "contiguous", False, torch.float32, 2, 1, [8, 12], {"window_size": (2, 3)}, True),
    # ALiBi: one call per pair of chunks at a distance, the aligned pairs packed
    (2, "zigzag", True, torch.float32, 4, 2, [12, 4, 20], {"alibi": "heads"}, False),
    (4, "contiguous", False, torch.bfloat16, 2, 1, [8, 16], {"alibi": "documents"}, False),
    (2, "zigzag", False, torch.float32, 2, 2, [8, 12], {"alibi": "documents", "window_size": (3, 2)}, False),
    (2, "contiguous", True, torch.float32, 2, 1, [4, 8], {"alibi": "heads"}, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-"
                         f"{str(c[3])[6:]}-h{c[4]}k{c[5]}-{'_'.join(map(str, c[6]))}-{c[7]}"
                         f"{'-interpreter' if c[8] else ''}")
def test_ring_varlen_matches_oracle(ranks, case):
    world_size, layout, causal, dtype, nheads, nheads_k, lengths, options, interpret = case
    if interpret and ranks.backend == "nccl":
        pytest.skip("the interpreter is for CPU tensors")
    ranks.run(world_size, varlen_case, seed=int(torch.randint(0, 2**31 - 1, ())), layout=layout, causal=causal,
             dtype=dtype, nheads=nheads, nheads_k=nheads_k, headdim=32, lengths=lengths, interpret=interpret,
             **options)


def varlen_lse_case(seed, layout):
    from cluster import set_backend_env

    from flashtile.testing import attention_ref

    set_backend_env(False)
    torch.manual_seed(seed)
    rank, world_size = dist.get_rank(group()), dist.get_world_size(group())
    lengths = [4 * world_size, 2 * world_size, 6 * world_size]
    cu_seqlens = cu(lengths).to(device())
    q, k, v = (torch.randn(sum(lengths), 2, 16, dtype=torch.float64, device=device()) for _ in range(3))
    refs = [attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, return_lse=True)
            for a, b in zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])]
    ref_out = torch.cat([out[0] for out, _ in refs])
    ref_lse = torch.cat([lse[0] for _, lse in refs], dim=1)  # (nheads, total)
    out, lse, s_dmask = ring_flash_attn_varlen_func(
        *(varlen_shard(t.float(), cu_seqlens, rank, world_size, layout) for t in (q, k, v)), cu_seqlens,
        max(lengths), group(), causal=True, layout=layout, return_attn_probs=True)
    assert s_dmask is None and lse.dtype == torch.float32 and lse.shape == (2, sum(lengths) // world_size)
    torch.testing.assert_close(lse, varlen_shard(ref_lse.float(), cu_seqlens, rank, world_size, layout, dim=1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, varlen_shard(ref_out.float(), cu_seqlens, rank, world_size, layout),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_varlen_returns_the_global_lse(ranks, layout):
    ranks.run(4, varlen_lse_case, seed=int(torch.randint(0, 2**31 - 1, ())), layout=layout)


def varlen_errors_case():
    cu_seqlens = cu([8, 4])
    q = torch.randn(6, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens gives document 1 the length 6, not a multiple of 4"):
        ring_flash_attn_varlen_func(*3 * [torch.randn(7, 2, 16)], cu([8, 6]), 8, group())
    with pytest.raises(ValueError, match="q has 5 rows"):
        ring_flash_attn_varlen_func(q[:5], q[:6], q[:6], cu_seqlens, 8, group(), layout="contiguous")
    with pytest.raises(ValueError, match="max_seqlen"):
        ring_flash_attn_varlen_func(q, q, q, cu_seqlens, 4, group(), layout="contiguous")
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32"):
        ring_flash_attn_varlen_func(q, q, q, cu_seqlens.long(), 8, group(), layout="contiguous")
    with pytest.raises(ValueError, match="layout"):
        ring_flash_attn_varlen_func(q, q, q, cu_seqlens, 8, group(), layout="striped")
    with pytest.raises(ValueError, match="3-D"):
        ring_flash_attn_varlen_func(q[None], q[None], q[None], cu_seqlens, 8, group())


def test_ring_varlen_errors(gloo):
    gloo.run(2, varlen_errors_case)


def test_varlen_shard_round_trip():
    cu_seqlens = cu([8, 0, 4, 12])
    x = torch.arange(24)
    shards = [varlen_shard(x, cu_seqlens, rank, 2) for rank in range(2)]
    # zigzag per document: chunks r and 3 - r of each document's 4 chunks
    assert shards[0].tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]
    assert torch.equal(varlen_unshard(shards, cu_seqlens), x)
    contiguous = [varlen_shard(x, cu_seqlens, rank, 2, "contiguous") for rank in range(2)]
    assert contiguous[1].tolist() == [4, 5, 6, 7, 10, 11, 18, 19, 20, 21, 22, 23]
    assert torch.equal(varlen_unshard(contiguous, cu_seqlens, "contiguous"), x)
    with pytest.raises(ValueError, match="cu_seqlens gives document 2 the length 4, not a multiple of 8"):
        varlen_shard(x, cu_seqlens, 0, 4)
