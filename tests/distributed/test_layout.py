"""Sharding a sequence across ranks (flashtile/distributed/layout.py) and the
blocks each ring step computes (plan_blocks in flashtile/distributed/ring.py):
the union of a step's blocks must be exactly the global mask."""

import itertools

import pytest
import torch

from flashtile.distributed import (
    contiguous_shard,
    contiguous_unshard,
    shard,
    unshard,
    zigzag_shard,
    zigzag_unshard,
)
from flashtile.distributed.layout import shard_chunks
from flashtile.distributed.ring import plan_blocks


def test_zigzag_shards_pair_early_and_late_chunks():
    x = torch.arange(12)
    assert [zigzag_shard(x, 0, r, 3).tolist() for r in range(3)] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    assert [contiguous_shard(x, 0, r, 3).tolist() for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unshard_inverts_shard(layout, world_size):
    x = torch.randn(2, 8 * world_size, 3, 5)
    shards = [shard(x, 1, r, world_size, layout) for r in range(world_size)]
    assert all(s.shape == (2, 8, 3, 5) for s in shards)
    assert torch.equal(unshard(shards, 1, layout), x)
    named_shard, named_unshard = {"zigzag": (zigzag_shard, zigzag_unshard),
                                  "contiguous": (contiguous_shard, contiguous_unshard)}[layout]
    assert torch.equal(named_unshard([named_shard(x, 1, r, world_size) for r in range(world_size)], 1), x)


def test_shard_errors_name_the_problem():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=r"multiple of 6"):
        zigzag_shard(x, 1, 0, 3)
    with pytest.raises(ValueError, match=r"multiple of 4"):
        contiguous_shard(x, 1, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        zigzag_shard(x, 1, 5, 5)
    with pytest.raises(ValueError, match="layout"):
        shard(x, 1, 0, 2, layout="striped")
    with pytest.raises(ValueError, match="one shape"):
        zigzag_unshard([torch.randn(2, 4), torch.randn(2, 6)], 1)


def _mask_of_blocks(blocks, local_len):
    """The local (query row, key row) pairs the blocks compute, as the op masks them."""
    seen = torch.zeros(local_len, local_len, dtype=torch.int64)
    for b in blocks:
        rows = torch.arange(b.q_rows.stop - b.q_rows.start)[:, None]
        cols = torch.arange(b.k_rows.stop - b.k_rows.start)[None, :]
        left, right = b.window
        inside = torch.ones(rows.shape[0], cols.shape[1], dtype=torch.bool)
        if right >= 0:
            inside &= cols <= rows + b.diag + right
        if left >= 0:
            inside &= cols >= rows + b.diag - left
        seen[b.q_rows, b.k_rows] += inside
    return seen


def _global_positions(layout, rank, world_size, local_len):
    return torch.cat([torch.arange(c.global_start, c.global_start + c.length)
                      for c in shard_chunks(layout, rank, world_size, local_len)])


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (5, 0), (3, 7), (-1, 4), (0, 0), (12, -1)])
def test_blocks_cover_the_global_mask_once(layout, window):
    world_size, local_len = 3, 8
    left, right = window
    for rank, source in itertools.product(range(world_size), repeat=2):
        q_pos = _global_positions(layout, rank, world_size, local_len)[:, None]
        k_pos = _global_positions(layout, source, world_size, local_len)[None, :]
        expected = torch.ones(local_len, local_len, dtype=torch.bool)
        if right >= 0:
            expected &= k_pos <= q_pos + right
        if left >= 0:
            expected &= k_pos >= q_pos - left
        blocks = plan_blocks(shard_chunks(layout, rank, world_size, local_len),
                             shard_chunks(layout, source, world_size, local_len), window)
        assert torch.equal(_mask_of_blocks(blocks, local_len), expected.long()), (rank, source, blocks)


def test_zigzag_causal_steps_take_one_call_each():
    # own block causal; earlier ranks' blocks: all queries against their first chunk; later
    # ranks' blocks: the second query chunk against everything
    chunks = [shard_chunks("zigzag", r, 4, 8) for r in range(4)]
    assert [(b.q_rows, b.k_rows, b.window) for b in plan_blocks(chunks[1], chunks[1], (-1, 0))] == \
        [(slice(0, 8), slice(0, 8), (-1, 0))]
    assert [(b.q_rows, b.k_rows, b.window) for b in plan_blocks(chunks[1], chunks[0], (-1, 0))] == \
        [(slice(0, 8), slice(0, 4), (-1, -1))]
    assert [(b.q_rows, b.k_rows, b.window) for b in plan_blocks(chunks[1], chunks[3], (-1, 0))] == \
        [(slice(4, 8), slice(0, 8), (-1, -1))]
