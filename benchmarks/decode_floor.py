"""What a decoding step at batch 1 can cost at best: kernels that read the
same K/V bytes with the split kernel's grid but do less, timed the way
``decode.py`` times steps (CUDA graph replays over copies of the cache that
together exceed the L2).

    python benchmarks/decode_floor.py --cache-lens 8192,16384

Rows (us per step and % of the large-copy bandwidth):
- ``copy``: a device-to-device copy of one step's K and V (read + write
  counted, as the large copy is): what the copy engine path reaches at
  this size;
- ``stream``: a Triton kernel on the split kernel's grid (kv heads x
  splits) that streams its split's K/V tiles through the two products of
  the split kernel (so Triton pipelines the loads the same way) without
  the softmax, the LSE or a combine: the floor of any one-launch design
  with this grid; ``length from memory``: the same with the length loaded
  by each program (as the split kernel must) before its first K/V loads;
  ``stream paged``: the same with 16-row pages looked up per row (as the
  split kernel did) or per page (a vector of the tile's page ids, each
  broadcast over its rows);
- ``flashtile``: the step itself, and the split kernel without the combine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from decode import L2_BYTES, Step, _NoLaunch, copy_bandwidth, time_ms  # (benchmarks/ is the script's folder)


@triton.jit
def stream_kernel(Q, K, V, Out, Table, Seqlen, stride_kb, stride_ks, stride_kh, seqlen, tiles_per_split,
                  PAGE_SIZE: tl.constexpr, PER_PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, LOAD_LENGTH: tl.constexpr = False):
    hk = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + offs_m[:, None] * BLOCK_D + offs_d[None, :])
    if LOAD_LENGTH:
        # as the split kernel does: the length from memory, and the split's share from it
        seqlen = tl.load(Seqlen)
        tiles_per_split = tl.cdiv(tl.cdiv(seqlen, BLOCK_N), tl.num_programs(1))
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seqlen)
    k_base = K + hk * stride_kh
    v_base = V + hk * stride_kh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if PAGE_SIZE == 0:
            rows = cols.to(tl.int64) * stride_ks
        elif PER_PAGE:
            # one id per page of the tile, broadcast over the page's rows
            pages = tl.load(Table + start_n // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)).to(tl.int64)
            # (a select and sum rather than a reshape, which would keep Triton from pipelining the loads)
            page_of_row = tl.sum(tl.where(offs_n[:, None] // PAGE_SIZE == tl.arange(0, BLOCK_N // PAGE_SIZE)[None, :],
                                          pages[None, :], 0), 1)
            rows = page_of_row * stride_kb + (offs_n % PAGE_SIZE) * stride_ks
        else:
            page = tl.load(Table + cols // PAGE_SIZE).to(tl.int64)
            rows = page * stride_kb + (cols % PAGE_SIZE) * stride_ks
        k = tl.load(k_base + rows[:, None] + offs_d[None, :])
        v = tl.load(v_base + rows[:, None] + offs_d[None, :])
        s = tl.dot(q, tl.trans(k))
        acc = tl.dot(s.to(v.dtype), v, acc)
    tl.store(Out + (hk * tl.num_programs(1) + split) * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D
             + offs_d[None, :], acc)


def stream_fn(step: Step, page_size: int, per_page: bool, splits: int, block_n: int, warps: int, stages: int,
              load_length: bool = False):
    cache_len = step.cache_len
    nheads_k, d = step.caches[0][0].shape[-2:]
    # one length per cache copy, as each copy's step would have
    lengths = [torch.full((1,), cache_len, device="cuda", dtype=torch.int32) for _ in step.caches]
    q = torch.randn(16, d, device="cuda", dtype=torch.bfloat16) * 0.01
    out = torch.empty(nheads_k * splits * 16 * d, device="cuda", dtype=torch.float32)
    tiles_per_split = triton.cdiv(triton.cdiv(cache_len, block_n), splits)

    def fn():
        for (k, v), table, length in zip(step.caches, step.tables, lengths):
            stream_kernel[(nheads_k, splits)](
                q, k, v, out, table if table is not None else k, length, k.stride(0), k.stride(1), k.stride(2),
                cache_len, tiles_per_split, PAGE_SIZE=page_size, PER_PAGE=per_page, BLOCK_M=16,
                BLOCK_N=block_n, BLOCK_D=d, LOAD_LENGTH=load_length, num_warps=warps, num_stages=stages)
    return fn


def copy_fn(step: Step):
    dst = [(torch.empty_like(k), torch.empty_like(v)) for k, v in step.caches]

    def fn():
        for (k, v), (dk, dv) in zip(step.caches, dst):
            dk.copy_(k)
            dv.copy_(v)
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-lens", default="8192,16384")
    parser.add_argument("--out", default="bench_results/decode_floor")
    args = parser.parse_args()
    from flashtile.api import decode as decode_api
    from flashtile.api import launch

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (512 MiB, read + write): {bandwidth / 1e12:.2f} TB/s  [{torch.cuda.get_device_name()}]")
    rows = []

    def record(cache_len, name, fn, copies, kv_bytes, counted=None):
        fn()
        ms = time_ms(fn, eager=False) / copies
        frac = (counted or kv_bytes) / (ms * 1e-3) / bandwidth
        rows.append(dict(cache_len=cache_len, case=name, us=ms * 1e3, bw_frac=frac))
        print(f"L={cache_len:6d} {name:44s} {ms * 1e3:7.1f} us  {100 * frac:5.1f}% bw", flush=True)

    for cache_len in [int(x) for x in args.cache_lens.split(",")]:
        for page_size in (None, 16):
            step = Step(1, cache_len, 32, 8, 128, 1, page_size)
            step.cache_len = cache_len
            kv, copies = step.kv_bytes, step.copies
            assert kv * copies >= 4 * L2_BYTES
            if page_size is None:
                record(cache_len, "copy (read + write counted)", copy_fn(step), copies, kv, 2 * kv)
                for splits, bn, w, st in ((16, 128, 4, 3), (32, 128, 4, 3), (16, 128, 4, 4), (32, 64, 4, 5),
                                          (64, 64, 4, 3), (132, 64, 4, 3)):
                    record(cache_len, f"stream {splits} splits {bn}x{w}x{st}",
                           stream_fn(step, 0, False, splits, bn, w, st), copies, kv)
                record(cache_len, "stream 16 splits 128x4x3, length from memory",
                       stream_fn(step, 0, False, 16, 128, 4, 3, load_length=True), copies, kv)
            else:
                for per_page in (False, True):
                    for splits, bn, w, st in ((32, 64, 4, 5), (16, 128, 4, 5), (32, 128, 4, 3)):
                        record(cache_len, f"stream paged16 {'per page' if per_page else 'per row'} {splits} splits "
                               f"{bn}x{w}x{st}", stream_fn(step, 16, per_page, splits, bn, w, st), copies, kv)
            name = "flashtile" if page_size is None else "flashtile paged16"
            record(cache_len, name, step.flashtile(0), copies, kv)
            # the split kernel alone: its merge off and the combine kernel not launched
            combine = decode_api.attn_combine_kernel
            decode_api.attn_combine_kernel, decode_api.MERGE_IN_KERNEL = _NoLaunch(), False
            launch.clear_caches()
            record(cache_len, name + " split kernel alone", step.flashtile(0), copies, kv)
            decode_api.attn_combine_kernel, decode_api.MERGE_IN_KERNEL = combine, True
            launch.clear_caches()
            del step
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(copy_bandwidth=bandwidth, device=torch.cuda.get_device_name(),
                                                        torch=torch.__version__, triton=triton.__version__,
                                                        rows=rows), indent=1))


if __name__ == "__main__":
    main()
