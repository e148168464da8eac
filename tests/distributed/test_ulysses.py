"""Ulysses attention (flashtile/distributed/ulysses.py) on CPU processes joined by
gloo, against the oracle over the whole sequence, forward and gradients."""

import pytest
import torch
from cluster import device, group, set_backend_env, sharded
from helpers import check_attention

from flashtile.distributed import ulysses_flash_attn_func

# (world_size, layout, causal, dtype, nheads, nheads_k, options, interpret)
CASES = [
    (2, "zigzag", True, torch.float32, 4, 2, {}, False),
    (2, "contiguous", False, torch.bfloat16, 2, 2, {}, False),
    (3, "zigzag", True, torch.bfloat16, 6, 3, {"window_size": (7, 0)}, False),
    (3, "contiguous", False, torch.float32, 3, 1, {"softcap": 2.0}, False),
    (4, "zigzag", True, torch.float32, 4, 2, {}, False),
    (4, "contiguous", False, torch.float32, 8, 1, {"window_size": (5, 9)}, False),
    (2, "zigzag", True, torch.float32, 4, 2, {"alibi_slopes": "per batch"}, False),
    (2, "zigzag", True, torch.bfloat16, 2, 1, {}, True),
]


def ulysses_case(seed, world_size, layout, causal, dtype, nheads, nheads_k, options, interpret, batch=2,
                 headdim=32, local_len=16):
    set_backend_env(interpret)
    torch.manual_seed(seed)
    seqlen = world_size * local_len
    q = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype, device=device())
    k, v = (torch.randn(batch, seqlen, nheads_k, headdim, dtype=dtype, device=device()) for _ in range(2))
    options = dict(options)
    if options.get("alibi_slopes") == "per batch":
        options["alibi_slopes"] = torch.rand(batch, nheads, device=device())

    def ulysses(q, k, v):
        return ulysses_flash_attn_func(q, k, v, group(), causal=causal, layout=layout, **options)

    check_attention(sharded(ulysses, layout), q, k, v, causal=causal, **options)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}-"
                         f"{str(c[3])[6:]}-h{c[4]}k{c[5]}-{list(c[6])}{'-interpreter' if c[7] else ''}")
def test_ulysses_matches_oracle(ranks, case):
    world_size, *rest = case
    if case[-1] and ranks.backend == "nccl":
        pytest.skip("the interpreter is for CPU tensors")
    ranks.run(world_size, ulysses_case, seed=int(torch.randint(0, 2**31 - 1, ())), world_size=world_size,
             **dict(zip(["layout", "causal", "dtype", "nheads", "nheads_k", "options", "interpret"], rest)))


def errors_case():
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match=r"nheads \(4\) must be a multiple of the world size"):
        ulysses_flash_attn_func(q, q, q, group())
    q = torch.randn(1, 8, 6, 16)
    with pytest.raises(ValueError, match=r"nheads_k \(2\)"):
        ulysses_flash_attn_func(q, q[:, :, :2], q[:, :, :2], group())
    with pytest.raises(ValueError, match="seqlen_local must be even"):
        ulysses_flash_attn_func(q[:, :7], q[:, :7], q[:, :7], group())
    with pytest.raises(NotImplementedError, match="dropout_p"):
        ulysses_flash_attn_func(q, q, q, group(), dropout_p=0.1)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ulysses_flash_attn_func(q, q, q, group(), alibi_slopes=torch.ones(3))


def test_ulysses_errors(gloo):
    gloo.run(3, errors_case)
