"""Launcher of the split-KV decoding kernels (attention of a few query tokens
against a key/value cache): the split heuristic, the counters of the splits'
in-kernel merge, and the combine kernel where that merge cannot be used.

The cache is either contiguous ``(batch_cache, seqlen_cache, nheads_k, d)``
or paged ``(num_pages, page_size, nheads_k, d)`` with an int32
``block_table`` ``(batch, max_pages)``. Sequence ``b`` attends to keys
``[leftpad[b], cache_seqlens[b] + seqlen_new)`` of its cache; causal, window
and ALiBi positions are aligned to the bottom-right corner.
"""

from __future__ import annotations

import torch
import triton

from ..kernels.decode import attn_combine_kernel, attn_decode_kernel
from .choose import KernelLaunch
from .device import LOG2E, block_d_of, capability_of, cdiv, dot_precision, interpreting, next_power_of_2, sm_count
from .plans import layout_key, plan_setups, register_cache, run_planned
from ....options import empty_output
from .invariant import SPLIT_KEYS, batch_invariant
from .table import decode_config

MAX_SPLITS = 128
# a split should stream at least this many keys, or the combine costs more than it saves
MIN_KEYS_PER_SPLIT = 256
# warps of a combine program (one output row: splits x head dim values)
COMBINE_WARPS = 4
# The split kernel's last program of a (batch, kv head, query block) merges the splits
# where it reads all of them for all the block's rows at once (MERGE_ROWS rows x splits x
# head dim fp32 values within MERGE_MAX_VALUES); else the combine kernel does: one launch
# a step saves the second launch's fixed cost, while a merge that takes a block's rows in
# several rounds costs more than it saves (docs/experiments/2026-12-02-decoding-8k.md).
MERGE_IN_KERNEL = True
MERGE_MAX_VALUES = 8192


def merge_layout(num_splits: int, block_d: int, block_m: int, rows: int) -> tuple[int, int] | None:
    """(BLOCK_S, MERGE_ROWS) of the split kernel's own merge of ``num_splits`` parts of
    ``rows = seqlen_q * group_size`` rows, or None where the combine kernel merges them."""
    block_s = max(2, next_power_of_2(num_splits))
    merge_rows = min(block_m, MERGE_MAX_VALUES // (block_s * block_d))
    if not MERGE_IN_KERNEL or num_splits == 1 or merge_rows < min(block_m, rows):
        return None
    return block_s, merge_rows


# The merges' counters: int32 zeros, one per (batch, kv head, query block) of a launch,
# which its merging programs leave zero again. They are slices of a reserve that no CUDA
# graph pool manages (a graph pool hands the memory of tensors it does not know about to
# others), allocated outside graph capture: eager calls take one slice per stream (calls
# on a stream run one after another), each captured launch its own for good. Where no
# slice can be had (during a capture before any eager call, or where the allocator put the
# reserve in a graph pool) the combine kernel merges instead.
COUNTER_RESERVE = 1 << 16
_reserves: dict[torch.device, list] = {}  # device -> [reserve, first free counter]
_stream_counters: dict[tuple, torch.Tensor] = {}  # (device, stream) -> the eager calls' slice


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _in_default_pool(t: torch.Tensor) -> bool:
    """True when ``t`` lies in the CUDA caching allocator's default pool (not a graph's)."""
    if t.device.type != "cuda":
        return True
    ptr = t.data_ptr()
    for segment in torch.cuda.memory_snapshot():
        if segment["address"] <= ptr < segment["address"] + segment["total_size"]:
            return tuple(segment.get("segment_pool_id", (-1, -1))) == (0, 0)
    return False


def _counter_slice(device: torch.device, count: int) -> torch.Tensor | None:
    """``count`` zero counters that no other launch uses, or None."""
    entry = _reserves.get(device)
    if entry is None or entry[1] + count > entry[0].numel():
        if _capturing(device):
            return None
        reserve = torch.zeros(max(COUNTER_RESERVE, count), dtype=torch.int32, device=device)
        if not _in_default_pool(reserve):
            return None
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # zero before other streams use it
        entry = _reserves[device] = [reserve, 0]  # slices given out keep the old reserve alive
    start = entry[1]
    entry[1] += count
    return entry[0][start:start + count]


def merge_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """``count`` zero int32 counters for a launch that merges its splits on ``device``'s
    current stream, or None (then the combine kernel merges)."""
    if _capturing(device):
        return _counter_slice(device, count)
    stream = triton.runtime.driver.active.get_current_stream(device.index) if device.type == "cuda" else 0
    counters = _stream_counters.get((device, stream))
    if counters is None or counters.numel() < count:
        counters = _counter_slice(device, count)
        if counters is None:
            return None
        _stream_counters[(device, stream)] = counters
    return counters


def num_splits_heuristic(programs: int, capacity: int, device: torch.device) -> int:
    """Splits of the key range so that about one program per multiprocessor runs,
    ``programs`` being batch * kv heads * query blocks without splits; each split
    streams at least MIN_KEYS_PER_SPLIT keys of a cache that holds up to
    ``capacity`` keys. More splits add tails and merge work, fewer leave
    multiprocessors idle; paged caches take the same count, their page ids
    being loaded a page at a time (docs/experiments/2026-12-02-decoding-8k.md)."""
    if device.type != "cuda" or interpreting():
        return 1 if capacity <= MIN_KEYS_PER_SPLIT else 2
    sms = sm_count(device)
    if programs >= 0.8 * sms:
        return 1
    return max(1, min(MAX_SPLITS, round(sms / programs), capacity // MIN_KEYS_PER_SPLIT))


# (config, switches) -> the pipeline stages of the split kernel that fit this GPU
_fitting_stages: dict[tuple, int] = register_cache({})


def _decode_setup(q, k_cache, v_cache, block_table, num_splits):
    """(launch config, number of splits, page lookup per row, merge layout or None, key tiles
    of each split or 0: as many as an even share gives) of one call."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    block_dv = block_d_of(v_cache.shape[-1])
    cfg = decode_config(seqlen_q * (nheads // nheads_k), max(block_d_of(head_dim), block_dv), q.element_size(),
                        capability_of(q.device),
                        k_cache.shape[1] if paged else 0, kv_elem_size=k_cache.element_size())
    m_blocks = cdiv(seqlen_q * (nheads // nheads_k), cfg.block_m)
    if batch_invariant():
        # parts of SPLIT_KEYS keys, as many as the cache holds: nothing depends on the batch
        # (the interface refuses a num_splits here)
        num_splits = cdiv(capacity, SPLIT_KEYS)
        if num_splits > MAX_SPLITS:
            raise NotImplementedError(f"flashtile: batch-invariant decoding of caches of more than "
                                      f"{MAX_SPLITS * SPLIT_KEYS} keys")
        return cfg, num_splits, False, merge_layout(num_splits, block_dv, cfg.block_m,
                                                    seqlen_q * (nheads // nheads_k)), SPLIT_KEYS // cfg.block_n
    if num_splits <= 0:
        num_splits = num_splits_heuristic(batch * nheads_k * m_blocks, capacity, q.device)
    num_splits = max(1, min(num_splits, MAX_SPLITS, cdiv(capacity, cfg.block_n)))
    row_lookup = False
    if paged and num_splits == 1:
        # enough programs without splits (large batches): the 5 stages that hide the page
        # lookups of a few programs cost occupancy here, and a page lookup per row pipelines
        # better than one per tile or page (docs/experiments/2026-12-02-decoding-8k.md)
        cfg = cfg._replace(block_n=min(cfg.block_n, 64), num_stages=min(cfg.num_stages, 3))
        row_lookup = True
    return cfg, num_splits, row_lookup, merge_layout(num_splits, block_dv, cfg.block_m,
                                                     seqlen_q * (nheads // nheads_k)), 0


def _decode_steps(call, cfg, num_splits, row_lookup, merge, seqlen_new, softmax_scale, window_left, window_right,
                  softcap, build_only, split_tiles=0):
    """The split kernel's launch and, with several splits not merged by it (``merge``:
    its merge layout, or None), the combine kernel's, run (or with ``build_only`` only built)
    for ``call``: (steps, builders), as launch plans take them."""
    (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi, out, lse, part_out, part_lse,
     _, sinks, k_descale, v_descale) = call
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    block_d = block_d_of(head_dim)
    head_dim_v = v_cache.shape[-1]
    block_dv = block_d_of(head_dim_v)
    paged = block_table is not None
    # the partial results of split 0 (or the outputs, with one split) and the stride between splits
    o_strides = part_out.stride()[-4:-1] + (0 if num_splits == 1 else part_out.stride(0),)
    l_strides = part_lse.stride()[-3:-1] + (0 if num_splits == 1 else part_lse.stride(0),)
    softcap_div = softcap if softcap > 0 else 1.0
    scalars = (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *o_strides, *l_strides,
               0 if block_table is None else block_table.stride(0),
               0 if alibi is None or alibi.dim() == 1 else alibi.stride(0),
               *((0, 0) if k_descale is None else k_descale.stride()), *((0, 0) if v_descale is None else v_descale.stride()),
               *out.stride()[:3], *lse.stride()[:2],
               nheads_k, seqlen_q, seqlen_new, nheads // nheads_k, block_table.shape[1] if paged else 0,
               window_left, window_right, softmax_scale * LOG2E, softmax_scale / softcap_div, softcap_div * LOG2E,
               split_tiles)
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, PAGE_SIZE=k_cache.shape[1] if paged else 0,
        HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFTPAD=leftpad is not None, MASK_LEFT=window_left >= 0,
        # query t sees keys up to t + seqlen_k - seqlen_q + window_right: every key once window_right
        # >= seqlen_q - 1 (a causal step of one token), and the mask's product is then skipped
        MASK_RIGHT=0 <= window_right < seqlen_q - 1, SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=dot_precision(q.dtype, q.device),
        ROW_LOOKUP=row_lookup, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        HAS_SINKS=sinks is not None, KV_FP8=k_descale is not None)
    if merge is not None:
        constexprs.update(MERGE=True, BLOCK_S=merge[0], MERGE_ROWS=merge[1])
    grid = (batch * nheads_k, num_splits, cdiv(seqlen_q * (nheads // nheads_k), cfg.block_m))

    def build_split(cfg, call):
        (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi, o, l, po, pl, counters,
         sinks, kd, vd) = call
        return (q, k_cache, v_cache, po, pl, cache_seqlens, q if cache_batch_idx is None else cache_batch_idx,
                q if block_table is None else block_table, q if leftpad is None else leftpad,
                q if alibi is None else alibi, q if sinks is None else sinks, q if kd is None else kd,
                q if vd is None else vd, o, l,
                cache_seqlens if counters is None else counters, *scalars)

    # shared memory: fewer pipeline stages while the compiler says they do not fit
    fit_key = (cfg, tuple(constexprs.items()))
    steps = []
    for stages in range(_fitting_stages.get(fit_key, cfg.num_stages), 0, -1):
        step = KernelLaunch(attn_decode_kernel, grid, build_split(cfg, call), cfg, dict(constexprs, num_stages=stages), None)
        if build_only:
            break
        try:
            step = step.run()
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise RuntimeError("flashtile: the decoding kernel does not fit on this GPU") from None
            continue
        _fitting_stages[fit_key] = stages
        break
    steps.append(step)
    builders = [build_split]
    if num_splits > 1 and merge is None:
        combine_scalars = (*part_out.stride()[1:4], part_out.stride(0), *part_lse.stride()[1:3], part_lse.stride(0),
                           *out.stride()[:3], *lse.stride()[:2], nheads, seqlen_q, num_splits)

        def build_combine(cfg, call):
            return (call[10], call[11], call[8], call[9], *combine_scalars)

        kwargs = dict(HEAD_DIM=head_dim_v, BLOCK_D=block_dv, BLOCK_S=max(2, next_power_of_2(num_splits)), num_warps=COMBINE_WARPS)
        step = KernelLaunch(attn_combine_kernel, (batch * seqlen_q * nheads,), build_combine(cfg, call), cfg, kwargs, None)
        steps.append(step if build_only else step.run())
        builders.append(build_combine)
    return steps, builders


def decode_triton(q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi,
                  seqlen_new, softmax_scale, window_left, window_right, softcap, num_splits, sinks=None,
                  k_descale=None, v_descale=None):
    """(out, lse) of the cached attention (arguments as ``flashtile.ops.decode``); ``sinks``:
    fp32 ``(nheads,)`` attention-sink logits, or None; ``k_descale``, ``v_descale``: fp32
    ``(batch, nheads_k)`` descales of a float8_e4m3fn cache (real value = stored value x
    descale, row ``b`` for sequence ``b`` of the call), or None for a cache in q's dtype."""
    # a call with the layout, options and split request of an earlier one replays its launches
    key = layout_key("decode", (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi,
                                sinks, k_descale, v_descale),
                     (seqlen_new, softmax_scale, window_left, window_right, softcap, num_splits))
    setup = plan_setups.get(key)
    if setup is None:
        setup = _decode_setup(q, k_cache, v_cache, block_table, num_splits)
    plan_setups[key] = setup  # a replayed call skips the heuristics too
    cfg, splits, row_lookup, merge, split_tiles = setup
    counters = None
    if merge is not None:
        batch, seqlen_q, nheads, _ = q.shape
        nheads_k = k_cache.shape[2]
        counters = merge_counters(q.device, batch * nheads_k * cdiv(seqlen_q * (nheads // nheads_k), cfg.block_m))
        if counters is None:
            merge = None
    key = key + (merge is not None,)  # the plans with and without the merge differ
    out = empty_output(q, v_cache.shape[-1])
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), device=q.device, dtype=torch.float32)
    if splits == 1:
        part_out, part_lse = out, lse
    else:
        part_out = torch.empty((splits, *out.shape), device=q.device, dtype=torch.float32)
        part_lse = torch.empty((splits, *lse.shape), device=q.device, dtype=torch.float32)
    call = (q, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, leftpad, alibi, out, lse, part_out,
            part_lse, counters, sinks, k_descale, v_descale)
    run_planned(key, call, lambda build_only: _decode_steps(call, cfg, splits, row_lookup, merge, seqlen_new,
                                                      softmax_scale, window_left, window_right, softcap, build_only,
                                                      split_tiles))
    return out, lse

