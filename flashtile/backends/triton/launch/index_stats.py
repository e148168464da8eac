"""The checks of a KV-cache call's index tensors (``cache_seqlens``, ``block_table``,
...) as statistics: one launch of the statistics kernel (replayed by a launch
plan) and one copy to the host on a GPU and under the interpreter, PyTorch
reductions on the CPU."""

from __future__ import annotations

import torch

from ..kernels.index_checks import STATS, index_stats_kernel
from .choose import KernelLaunch
from .device import interpreting
from .plans import layout_key, run_planned


def _index_stats_steps(call, seqlen_new: int, page_size: int, build_only: bool):
    """The statistics kernel's launch for ``call`` = (cache_seqlens, leftpad,
    cache_batch_idx, block_table, stats), as launch plans take it."""
    table = call[3]
    max_pages = 0 if table is None else table.shape[1]
    stride_tb = 0 if table is None else table.stride(0)

    def build(cfg, call):
        seqlens, leftpad, batch_idx, table, stats = call
        return (seqlens, seqlens if leftpad is None else leftpad, seqlens if batch_idx is None else batch_idx,
                seqlens if table is None else table, stats, seqlens.shape[0], seqlen_new, stride_tb, max_pages)

    kwargs = dict(HAS_LEFTPAD=call[1] is not None, HAS_BATCH_IDX=call[2] is not None,
                  PAGE_SIZE=0 if table is None else page_size, BLOCK_B=128, BLOCK_P=128, num_warps=4)
    step = KernelLaunch(index_stats_kernel, (1,), build(None, call), None, kwargs, None)
    return [step if build_only else step.run()], [build]


def index_stats(cache_seqlens, seqlen_new, leftpad, cache_batch_idx, block_table, page_size) -> dict[str, int]:
    """The statistics ``STATS`` of kernels/index_checks.py: one launch (a launch plan's
    replay after the first call of a layout) on a GPU and under the interpreter,
    PyTorch reductions on the CPU; fetched to the host in one copy."""
    if cache_seqlens.is_cuda or interpreting():
        stats = torch.empty(len(STATS), dtype=torch.int64, device=cache_seqlens.device)
        call = (cache_seqlens, leftpad, cache_batch_idx, block_table, stats)
        key = layout_key("index_stats", call[:4], (seqlen_new, page_size))
        run_planned(key, call, lambda build_only: _index_stats_steps(call, seqlen_new, page_size, build_only))
        return dict(zip(STATS, stats.tolist()))
    seqlens = cache_seqlens.long()
    lengths = seqlens + seqlen_new
    zero = seqlens.new_zeros(1)

    def low(t):
        return torch.cat([zero] if t is None else [zero, t.flatten().long()]).min()

    def high(t):
        return torch.cat([zero] if t is None else [zero, t.flatten().long()]).max()

    pages = None
    if block_table is not None:
        used = torch.arange(block_table.shape[1])[None, :] < (lengths[:, None] + page_size - 1) // page_size
        pages = block_table[used]
    over = None if leftpad is None else leftpad.long() - lengths
    values = [low(seqlens), high(lengths), high(seqlens), low(leftpad), high(over), low(cache_batch_idx),
              high(cache_batch_idx), low(pages), high(pages)]
    return dict(zip(STATS, torch.stack(values).tolist()))
