"""Does a call through the launch table time like the same config forced?

``tune.py`` timed flashtile's table 2-4% below the table's own config forced
on every launch name at 2k-4k keys (H200). The two paths differ on the host
only: a table call replays its launch plan, a forced one is not planned.
This times both, alternating, as eager calls (``do_bench``, which counts
host time that outlasts the GPU's queue) and as CUDA graph replays (GPU
time alone).

    python benchmarks/table_vs_forced.py --cases d128:4096:256x64x8x3h,d64:4096:128x128x4x3h
"""

import argparse

import torch
from triton.testing import do_bench, do_bench_cudagraph

import flashtile
from flashtile.api import launch
from flashtile.kernels.configs import LaunchConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="d128:4096:256x64x8x3h,d128:2048:256x64x8x3h,d64:4096:128x128x4x3h")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for case in args.cases.split(","):
        dim, seqlen, text = case.split(":")
        d, s = int(dim[1:]), int(seqlen)
        b, h = max(1, 16384 // s), 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * s * s * d
        fn = lambda: flashtile.flash_attn_func(q, k, v)  # noqa: E731
        forced = {name: LaunchConfig.parse(text) for name in launch.FORWARD_NAMES}
        best = {}
        for _ in range(args.rounds):
            for path in ("table", "forced"):
                launch.forced_configs.clear()
                if path == "forced":
                    launch.forced_configs.update(forced)
                fn()
                for timer in ("eager", "graph"):
                    bench = do_bench if timer == "eager" else do_bench_cudagraph
                    try:
                        ms = bench(fn, rep=50, return_mode="median")
                    except Exception as exc:  # reported, not fatal
                        print(f"{case} {path}/{timer}: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    key = (path, timer)
                    best[key] = max(best.get(key, 0.0), flops / ms * 1e-9)
        launch.forced_configs.clear()
        print(f"{case}: " + "  ".join(f"{p}/{t} {tf:.0f}" for (p, t), tf in best.items()), flush=True)


if __name__ == "__main__":
    main()
