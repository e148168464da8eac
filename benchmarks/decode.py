"""Decoding against a KV cache on a GPU: flashtile's split-KV kernel
(contiguous and paged caches) against PyTorch SDPA's flash backend.

    python benchmarks/decode.py --out results/decode

One decoding step: ``seqlen_q`` new query tokens per sequence attend to a
cache of ``L`` keys (bf16, 32 query heads / 8 kv heads, head dim 128 unless
told). Every provider is timed in the same run with CUDA graphs (as serving
engines run decoding steps; ``--eager`` times plain launches instead), median
of replays. Each timed replay visits several copies of the cache so that
together they are at least 4x the L2 cache: the numbers are device-memory
numbers, not L2 ones. The effective bandwidth is the bytes of K and V the
step must read over its time, compared with a device-to-device copy
measured in the same run.

``--kv-fp8`` adds the FP8 cache table: one decoding step (batch 1, the heads
and head dim above) against a bf16 cache and against a float8_e4m3fn cache of
the same length (``--fp8-lens``, 32k to 128k keys by default), contiguous and
paged, and the ratio of the two times (the fp8 cache reads half the bytes).
``--sweep-cache-dtype fp8`` runs the tile sweeps on an fp8 cache.

    python benchmarks/decode.py --kv-fp8 --skip-table --out results/decode_fp8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

import flashtile

L2_BYTES = 60 * 2**20
FP8 = torch.float8_e4m3fn


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def time_ms(fn, eager: bool) -> float:
    if eager:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


class Step:
    """Inputs of one decoding step, in ``copies`` independent sets."""

    def __init__(self, batch, cache_len, nheads, nheads_k, head_dim, seqlen_q, page_size, dtype=torch.bfloat16,
                 cache_dtype=None):
        """``cache_dtype``: the cache's dtype, q's ``dtype`` by default, or float8_e4m3fn
        (then with fp32 descales (batch, nheads_k))."""
        cache_dtype = dtype if cache_dtype is None else cache_dtype
        kv_bytes = 2 * batch * cache_len * nheads_k * head_dim * torch.finfo(cache_dtype).bits // 8
        self.kv_bytes = kv_bytes
        self.copies = max(1, math.ceil(4 * L2_BYTES / kv_bytes))
        dev = "cuda"
        self.q = [torch.randn(batch, seqlen_q, nheads, head_dim, device=dev, dtype=dtype) for _ in range(self.copies)]
        self.lens = torch.full((batch,), cache_len, dtype=torch.int32, device=dev)
        self.caches = []
        self.tables = []
        self.descales = {}
        if cache_dtype == FP8:
            # random normal values stored as e4m3 with a scale of 1/64 per (sequence, kv head)
            self.descales = dict(k_descale=torch.full((batch, nheads_k), 1 / 64, device=dev),
                                 v_descale=torch.full((batch, nheads_k), 1 / 64, device=dev))
        for _ in range(self.copies):
            if page_size is None:
                shape = (batch, cache_len, nheads_k, head_dim)
                table = None
            else:
                pages = batch * math.ceil(cache_len / page_size)
                shape = (pages, page_size, nheads_k, head_dim)
                # pages of a sequence scattered over the pool, as after a while of serving
                table = torch.randperm(pages, device=dev).int().reshape(batch, -1)
            self.caches.append(tuple(torch.randn(shape, device=dev, dtype=dtype).mul_(64 if self.descales else 1)
                                     .to(cache_dtype) for _ in range(2)))
            self.tables.append(table)

    def flashtile(self, num_splits=0):
        def fn():
            for q, (k, v), table in zip(self.q, self.caches, self.tables):
                flashtile.flash_attn_with_kvcache(q, k, v, cache_seqlens=self.lens, block_table=table,
                                                  num_splits=num_splits, **self.descales)
        return fn


def sdpa_step(batch, cache_len, nheads, nheads_k, head_dim, seqlen_q, backend, dtype=torch.bfloat16):
    """SDPA on its own layout (batch, heads, seqlen, dim), GQA through enable_gqa."""
    kv_bytes = 2 * batch * cache_len * nheads_k * head_dim * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(4 * L2_BYTES / kv_bytes))
    qs = [torch.randn(batch, nheads, seqlen_q, head_dim, device="cuda", dtype=dtype) for _ in range(copies)]
    kvs = [(torch.randn(batch, nheads_k, cache_len, head_dim, device="cuda", dtype=dtype),
            torch.randn(batch, nheads_k, cache_len, head_dim, device="cuda", dtype=dtype)) for _ in range(copies)]

    def fn():
        with sdpa_kernel([backend]):
            for q, (k, v) in zip(qs, kvs):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return fn, copies


def run_case(batch, cache_len, args, bandwidth) -> dict:
    nheads, nheads_k, d, seqlen_q = args.nheads, args.nheads_k, args.head_dim, args.seqlen_q
    row = dict(batch=batch, cache_len=cache_len, nheads=nheads, nheads_k=nheads_k, head_dim=d, seqlen_q=seqlen_q)
    kv_bytes = None
    variants = [("flashtile", None, 0), ("flashtile_no_split", None, 1)] + \
        [(f"flashtile_paged{p}", p, 0) for p in args.page_sizes]
    for name, page_size, splits in variants:
        step = Step(batch, cache_len, nheads, nheads_k, d, seqlen_q, page_size)
        kv_bytes = step.kv_bytes
        fn = step.flashtile(splits)
        fn()
        row[name] = time_ms(fn, args.eager) / step.copies
        del step
        torch.cuda.empty_cache()
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            fn, copies = sdpa_step(batch, cache_len, nheads, nheads_k, d, seqlen_q, backend)
            fn()
            row[name] = time_ms(fn, args.eager) / copies
        except RuntimeError as exc:  # backend refuses the shape / GQA on this build
            row[name] = None
            row[name + "_error"] = str(exc).splitlines()[0][:120]
        torch.cuda.empty_cache()
    row["kv_bytes"] = kv_bytes
    for key in list(row):
        if isinstance(row[key], float) and key != "kv_bytes":
            row[key + "_bw_frac"] = kv_bytes / (row[key] * 1e-3) / bandwidth
    return row


def sweep(args, bandwidth, page_size=None) -> list[dict]:
    """Tiles (``--tiles`` BLOCK_NxWARPSxSTAGES) and split counts of the kernel, for
    the launch table and the split heuristic, on a contiguous cache (``page_size``
    None) or a paged one. Also times the split kernel alone (partial results not
    merged: what the combine costs) with the default tiles."""
    from flashtile.backends.triton.launch import decode as decode_api
    from flashtile.backends.triton.launch import plans as launch_plans
    from flashtile.backends.triton.launch.table import LaunchConfig

    default = decode_api.decode_config
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")]
    splits_list = [int(x) for x in args.splits.split(",")]
    cases = [(1, int(n)) for n in args.sweep_lens.split(",")]
    if page_size is None:
        cases.append((64, args.batch64_cache_len))
    rows = []
    cache_dtype = FP8 if args.sweep_cache_dtype == "fp8" else None
    for batch, cache_len in cases:
        step = Step(batch, cache_len, args.nheads, args.nheads_k, args.head_dim, args.seqlen_q, page_size,
                    cache_dtype=cache_dtype)
        for block_n, warps, stages in tiles:
            decode_api.decode_config = lambda rows_, *a, bn=block_n, w=warps, st=stages, **kw: LaunchConfig(
                min(128, max(16, 1 << (max(rows_, 1) - 1).bit_length())), bn, w, st)
            launch_plans.clear_caches()  # launch plans made with the previous tiles
            for splits in splits_list:
                if batch == 64 and splits not in (0, 1):
                    continue
                try:
                    fn = step.flashtile(splits)
                    fn()
                    ms = time_ms(fn, args.eager) / step.copies
                except Exception as exc:  # a config that does not fit
                    print(batch, cache_len, block_n, warps, stages, splits, "failed:", str(exc).splitlines()[0][:80])
                    continue
                rows.append(dict(page_size=page_size, cache_dtype=args.sweep_cache_dtype, batch=batch,
                                 cache_len=cache_len, block_n=block_n, warps=warps,
                                 stages=stages, splits=splits, us=ms * 1e3,
                                 bw_frac=step.kv_bytes / (ms * 1e-3) / bandwidth))
                print(f"sweep page={page_size} batch={batch} L={cache_len} BLOCK_N={block_n} warps={warps} "
                      f"stages={stages} splits={splits}: {ms * 1e3:.1f} us, {100 * rows[-1]['bw_frac']:.1f}% bw",
                      flush=True)
        decode_api.decode_config = default
        # the split kernel alone: its merge off and the combine kernel not launched
        combine = decode_api.attn_combine_kernel
        decode_api.attn_combine_kernel, decode_api.MERGE_IN_KERNEL = _NoLaunch(), False
        launch_plans.clear_caches()
        fn = step.flashtile(0)
        fn()
        ms = time_ms(fn, args.eager) / step.copies
        decode_api.attn_combine_kernel, decode_api.MERGE_IN_KERNEL = combine, True
        launch_plans.clear_caches()
        rows.append(dict(page_size=page_size, batch=batch, cache_len=cache_len, splits=0, without_combine=True,
                         us=ms * 1e3, bw_frac=step.kv_bytes / (ms * 1e-3) / bandwidth))
        print(f"sweep page={page_size} batch={batch} L={cache_len} default tiles, split kernel without the "
              f"combine: {ms * 1e3:.1f} us, {100 * rows[-1]['bw_frac']:.1f}% bw", flush=True)
        del step
        torch.cuda.empty_cache()
    return rows


def setting_sweep(args, bandwidth, setting: str, values: list) -> list[dict]:
    """The step at batch 1 with each value of ``flashtile.backends.triton.launch.decode.<setting>`` (e.g.
    COMBINE_WARPS, MERGE_IN_KERNEL), for the contiguous cache and the pages of
    ``--page-sizes``, at the ``--splits`` counts, the values alternated over two rounds
    on the same cache copies."""
    from flashtile.backends.triton.launch import decode as decode_api
    from flashtile.backends.triton.launch import plans as launch_plans

    default = getattr(decode_api, setting)
    rows = []
    for cache_len in [int(n) for n in args.sweep_lens.split(",")]:
        for page_size in [None] + args.page_sizes:
            step = Step(1, cache_len, args.nheads, args.nheads_k, args.head_dim, args.seqlen_q, page_size)
            times = {}
            for _ in range(2):
                for splits in [int(n) for n in args.splits.split(",")]:
                    for value in values:
                        setattr(decode_api, setting, value)
                        launch_plans.clear_caches()
                        fn = step.flashtile(splits)
                        fn()
                        times.setdefault((splits, value), []).append(time_ms(fn, args.eager) / step.copies)
            for (splits, value), ms_list in times.items():
                ms = min(ms_list)
                rows.append(dict(page_size=page_size, batch=1, cache_len=cache_len, splits=splits,
                                 **{setting.lower(): value}, us=ms * 1e3, us_rounds=[t * 1e3 for t in ms_list],
                                 bw_frac=step.kv_bytes / (ms * 1e-3) / bandwidth))
                print(f"{setting}={value} page={page_size} L={cache_len} splits={splits}: {ms * 1e3:.1f} us "
                      f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in ms_list)}), {100 * rows[-1]['bw_frac']:.1f}% bw",
                      flush=True)
            del step
            torch.cuda.empty_cache()
    setattr(decode_api, setting, default)
    launch_plans.clear_caches()
    return rows


def fp8_table(args, bandwidth) -> list[dict]:
    """One decoding step at batch 1 with a bf16 cache and with a float8_e4m3fn cache, at
    the cache lengths of ``--fp8-lens``, contiguous and paged (``--page-sizes``): the two
    times (heuristic split count, the same tiles table) and their ratio."""
    rows = []
    for cache_len in [int(n) for n in args.fp8_lens.split(",")]:
        for page_size in [None] + args.page_sizes:
            row = dict(batch=1, cache_len=cache_len, page_size=page_size, nheads=args.nheads, nheads_k=args.nheads_k,
                       head_dim=args.head_dim, seqlen_q=args.seqlen_q)
            for name, cache_dtype in (("bf16", None), ("fp8", FP8)):
                step = Step(1, cache_len, args.nheads, args.nheads_k, args.head_dim, args.seqlen_q, page_size,
                            cache_dtype=cache_dtype)
                fn = step.flashtile(0)
                fn()
                ms = time_ms(fn, args.eager) / step.copies
                row[name + "_us"] = ms * 1e3
                row[name + "_bw_frac"] = step.kv_bytes / (ms * 1e-3) / bandwidth
                del step
                torch.cuda.empty_cache()
            row["fp8_speedup"] = row["bf16_us"] / row["fp8_us"]
            rows.append(row)
            print(f"fp8 cache: L={cache_len} page={page_size}: bf16 {row['bf16_us']:.1f} us "
                  f"({100 * row['bf16_bw_frac']:.1f}% bw), fp8 {row['fp8_us']:.1f} us "
                  f"({100 * row['fp8_bw_frac']:.1f}% bw): {row['fp8_speedup']:.2f}x", flush=True)
    return rows


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def print_rows(rows, providers):
    head = f"{'batch':>5} {'cache':>7} | " + " | ".join(f"{p:>18}" for p in providers)
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for p in providers:
            ms = r.get(p)
            cells.append(f"{'-':>18}" if ms is None else f"{ms * 1e3:8.1f}us {100 * r[p + '_bw_frac']:5.1f}%bw")
        print(f"{r['batch']:>5} {r['cache_len']:>7} | " + " | ".join(cells))
    print("(time per decoding step; %bw: K/V bytes over time, against the copy bandwidth)")


def save_plot(rows, providers, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if r["batch"] == 1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in providers:
        pts = [(r["cache_len"], 100 * r[p + "_bw_frac"]) for r in rows if r.get(p)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=p)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache length (keys)")
    ax.set_ylabel("K/V bytes / time, % of copy bandwidth")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-lens", default="8192,16384,32768,65536,131072")
    parser.add_argument("--batch64-cache-len", type=int, default=4096, help="cache length of the batch-64 case")
    parser.add_argument("--nheads", type=int, default=32)
    parser.add_argument("--nheads-k", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen-q", type=int, default=1)
    parser.add_argument("--page-sizes", default="16,256")
    parser.add_argument("--eager", action="store_true", help="time plain launches instead of CUDA graph replays")
    parser.add_argument("--out", default="bench_results/decode")
    parser.add_argument("--sweep", action="store_true", help="also sweep tiles and split counts")
    parser.add_argument("--sweep-paged", action="store_true",
                        help="sweep tiles and split counts of paged caches (the page sizes of --page-sizes)")
    parser.add_argument("--sweep-lens", default="8192,32768,131072", help="cache lengths of the sweeps (batch 1)")
    parser.add_argument("--tiles", default="128x4x3,64x4x3,64x4x5", help="BLOCK_NxWARPSxSTAGES of the sweeps")
    parser.add_argument("--splits", default="0,16,32", help="split counts of the sweeps (0: the heuristic)")
    parser.add_argument("--skip-table", action="store_true", help="only the sweeps (and the fp8 table)")
    parser.add_argument("--kv-fp8", action="store_true", help="also time a step with a bf16 cache against one with "
                        "a float8_e4m3fn cache at --fp8-lens (batch 1), and their ratio")
    parser.add_argument("--fp8-lens", default="32768,65536,131072", help="cache lengths of the fp8 table")
    parser.add_argument("--sweep-cache-dtype", choices=("bf16", "fp8"), default="bf16",
                        help="the cache dtype of --sweep / --sweep-paged")
    parser.add_argument("--combine-warps", default="", help="also time the step with these warps of the combine "
                        "kernel (e.g. 1,2,4), at the cache lengths of --sweep-lens and the --splits counts")
    parser.add_argument("--merge-ab", action="store_true", help="also time the step with the splits merged by the "
                        "split kernel and by the combine kernel, at --sweep-lens and the --splits counts")
    parser.add_argument("--merge-max-values", type=int, default=0, help="MERGE_MAX_VALUES of "
                        "flashtile.backends.triton.launch.decode "
                        "(the split kernel merges where splits x head dim values of a row fit; 0: as committed)")
    args = parser.parse_args()
    if args.merge_max_values:
        from flashtile.backends.triton.launch import decode as decode_api
        decode_api.MERGE_MAX_VALUES = args.merge_max_values
    args.page_sizes = [int(p) for p in args.page_sizes.split(",") if p]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU (the tests cover the CPU paths)")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    cases = [(1, int(n)) for n in args.cache_lens.split(",")] + [(64, args.batch64_cache_len)]
    rows = [] if args.skip_table else [run_case(b, n, args, bandwidth) for b, n in cases]
    providers = ["flashtile", "flashtile_no_split"] + [f"flashtile_paged{p}" for p in args.page_sizes] + \
        ["sdpa_flash", "sdpa_cudnn"]
    if rows:
        print_rows(rows, providers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth=bandwidth,
                timing="eager" if args.eager else "cuda graph replay")
    sweep_rows = sweep(args, bandwidth) if args.sweep else []
    paged_rows = [r for p in args.page_sizes for r in sweep(args, bandwidth, p)] if args.sweep_paged else []
    combine_rows = setting_sweep(args, bandwidth, "COMBINE_WARPS", [int(w) for w in args.combine_warps.split(",")]) \
        if args.combine_warps else []
    merge_rows = setting_sweep(args, bandwidth, "MERGE_IN_KERNEL", [True, False]) if args.merge_ab else []
    fp8_rows = fp8_table(args, bandwidth) if args.kv_fp8 else []
    (out / "decode.json").write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep_rows, sweep_paged=paged_rows,
                                                     combine=combine_rows, merge=merge_rows, fp8=fp8_rows), indent=1))
    if rows:
        save_plot(rows, providers, out / "decode.png",
              f"decoding, batch 1, {args.nheads}/{args.nheads_k} heads, d={args.head_dim}, bf16 ({meta['gpu']})")


if __name__ == "__main__":
    main()
