"""Ring attention (flashtile/distributed/ring.py) on CPU processes joined by gloo,
against the oracle over the whole sequence, forward and gradients."""

import pytest
import torch
from cluster import device, group, sharded
from helpers import check_attention

from flashtile.distributed import ring_flash_attn_func

# (world_size, layout, causal, dtype, nheads, nheads_k, headdim, seqlen per rank)
CASES = [
    (2, "zigzag", True, torch.float32, 4, 2, 40, 24),
    (2, "zigzag", False, torch.float32, 2, 2, 32, 16),
    (2, "zigzag", True, torch.bfloat16, 4, 1, 32, 24),
    (2, "zigzag", False, torch.bfloat16, 2, 2, 59, 16),
    (2, "contiguous", True, torch.float32, 2, 2, 32, 19),
    (2, "contiguous", False, torch.float32, 4, 2, 32, 16),
    (2, "contiguous", True, torch.bfloat16, 2, 1, 40, 16),
    (2, "contiguous", False, torch.bfloat16, 2, 2, 32, 16),
    (3, "zigzag", True, torch.float32, 4, 2, 32, 22),
    (3, "zigzag", False, torch.float32, 2, 2, 32, 16),
    (3, "zigzag", True, torch.bfloat16, 2, 2, 32, 16),
    (3, "contiguous", True, torch.float32, 2, 1, 40, 21),
    (3, "contiguous", False, torch.bfloat16, 4, 2, 32, 16),
    (4, "zigzag", True, torch.float32, 2, 1, 32, 16),
    (4, "zigzag", True, torch.bfloat16, 4, 2, 32, 16),
]


def ring_case(seed, world_size, layout, causal, dtype, nheads, nheads_k, headdim, local_len, interpret=False,
              batch=2, **options):
    from cluster import set_backend_env

    set_backend_env(interpret)
    torch.manual_seed(seed)  # the same whole-sequence inputs on every rank
    seqlen = world_size * local_len
    q = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype, device=device())
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, dtype=dtype, device=device()) for _ in range(2))

    def ring(q, k, v):
        return ring_flash_attn_func(q, k, v, group(), causal=causal, layout=layout, **options)

    check_attention(sharded(ring, layout), q, k, v, causal=causal, **options)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-"
                         f"{str(c[3])[6:]}-h{c[4]}k{c[5]}-d{c[6]}-s{c[7]}")
def test_ring_matches_oracle(ranks, case):
    world_size, *rest = case
    ranks.run(world_size, ring_case, seed=_seed(), world_size=world_size, **dict(zip(
        ["layout", "causal", "dtype", "nheads", "nheads_k", "headdim", "local_len"], rest)))


# sliding windows (in positions of the whole sequence), softcap, and the Triton kernels
# under the interpreter: (world_size, layout, causal, dtype, options, interpret)
OPTION_CASES = [
    (2, "zigzag", True, torch.float32, {"window_size": (9, 0)}, False),
    (3, "contiguous", False, torch.float32, {"window_size": (5, 11)}, False),
    (3, "zigzag", False, torch.bfloat16, {"window_size": (-1, 6), "softcap": 2.0}, False),
    (2, "contiguous", True, torch.float32, {"softcap": 1.5, "softmax_scale": 0.3}, False),
    (2, "zigzag", True, torch.bfloat16, {}, True),
    (3, "zigzag", False, torch.float32, {"window_size": (7, 3)}, True),
    # ALiBi over positions of the whole sequence: every pair of chunks at its own offset
    (2, "zigzag", True, torch.float32, {"alibi_slopes": torch.tensor([0.3, 0.05])}, False),
    (3, "zigzag", False, torch.bfloat16, {"alibi_slopes": torch.tensor([[0.2, 0.1], [0.02, 0.4]])}, False),
    (3, "contiguous", True, torch.float32, {"alibi_slopes": torch.tensor([0.25, 0.5]), "window_size": (9, 0)},
     False),
    (2, "zigzag", False, torch.float32, {"alibi_slopes": torch.tensor([0.3, 0.1])}, True),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: f"w{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-"
                         f"{str(c[3])[6:]}-{c[4]}{'-interpreter' if c[5] else ''}")
def test_ring_options_match_oracle(ranks, case):
    world_size, layout, causal, dtype, options, interpret = case
    if interpret and ranks.backend == "nccl":
        pytest.skip("the interpreter is for CPU tensors")
    ranks.run(world_size, ring_case, seed=_seed(), world_size=world_size, layout=layout, causal=causal, dtype=dtype,
                         nheads=2, nheads_k=1, headdim=32, local_len=16, interpret=interpret, **options)


def lse_case(seed, layout):
    import torch.distributed as dist
    from cluster import set_backend_env

    from flashtile.distributed import shard
    from flashtile.testing import attention_ref

    set_backend_env(False)
    torch.manual_seed(seed)
    rank, world_size = dist.get_rank(group()), dist.get_world_size(group())
    q, k, v = (torch.randn(1, 12 * world_size, 2, 16, dtype=torch.float64, device=device()) for _ in range(3))
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, return_lse=True)
    q, k, v = (t.float() for t in (q, k, v))
    out, lse, s_dmask = ring_flash_attn_func(*(shard(t, 1, rank, world_size, layout) for t in (q, k, v)),
                                             group(), causal=True, layout=layout, return_attn_probs=True)
    assert s_dmask is None and lse.dtype == torch.float32 and lse.shape == (1, 2, 12)
    torch.testing.assert_close(lse, shard(ref_lse, 2, rank, world_size, layout), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, shard(ref_out.float(), 1, rank, world_size, layout), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_returns_the_global_lse(ranks, layout):
    ranks.run(3, lse_case, seed=_seed(), layout=layout)


def errors_case():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="seqlen_local must be even"):
        ring_flash_attn_func(q[:, :7], q[:, :7], q[:, :7], layout="zigzag")
    with pytest.raises(ValueError, match="same positions"):
        ring_flash_attn_func(q, q[:, :6], q[:, :6])
    with pytest.raises(ValueError, match="layout"):
        ring_flash_attn_func(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="group"):
        ring_flash_attn_func(q, q, q, group="world")
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        ring_flash_attn_func(q, q, q, alibi_slopes=torch.ones(3))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        ring_flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(TypeError, match="dtype"):
        ring_flash_attn_func(q.double(), q.double(), q.double())


def test_ring_errors(gloo):
    gloo.run(2, errors_case)


def test_ring_needs_a_process_group():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="process group"):
        ring_flash_attn_func(q, q, q)
