"""Sweep launch configurations of the forward, dK/dV and dQ kernels on the GPU.

Prints, per (head dim, causal), the time of each candidate; the winners go
into the launch table (flashtile/backends/triton/launch/table.py) by hand, with
the numbers in the docs' experiments pages.

    python benchmarks/tools/tune.py --head-dims 64,128,256 --seqlen 4096
    python benchmarks/tools/tune.py --kernels fwd --configs 128x128x8x3,256x64x8x3h   # h: two halves
    python benchmarks/tools/tune.py --kernels fwd --configs 256x64x8x3h,128x128x8x3 --rounds 3   # alternating
"""

import argparse
import itertools

import torch
from triton.testing import do_bench

import flashtile
from flashtile.backends.triton.launch.attention import FORWARD_NAMES
from flashtile.backends.triton.launch.choose import force_config
from flashtile.backends.triton.launch.table import LaunchConfig

CANDIDATES = {
    "fwd": [LaunchConfig(128, n, w, s) for n, w, s in itertools.product((64, 128), (4, 8), (2, 3))]
    + [LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 128, 4, 3)],
    "dkdv": [LaunchConfig(m, n, w, s) for (m, n), w, s in itertools.product(((64, 64), (64, 128), (32, 128)), (4, 8), (2, 3, 4))],
    "dq": [LaunchConfig(m, n, w, s) for (m, n), w, s in itertools.product(((64, 64), (128, 64), (128, 32)), (4, 8), (2, 3, 4))],
}
# dV and dK in launches of their own (head dims where table.split_dkdv says so, or FLASHTILE_BWD_SPLIT=1)
CANDIDATES["dv"] = CANDIDATES["dk"] = CANDIDATES["dkdv"]
KERNELS = ("fwd", "dkdv", "dv", "dk", "dq")
# every launch-table name suffix a call can take (the backward's are among the forward's)
VARIANTS = [name.removeprefix("fwd") for name in FORWARD_NAMES]
# 4-byte inputs: tiles of half the area
_FP32_TILES = ((32, 32), (64, 32), (32, 64), (64, 64), (128, 32))
CANDIDATES_FP32 = {
    kernel: [LaunchConfig(m, n, w, s) for (m, n), w, s in itertools.product(_FP32_TILES, (4, 8), (2, 3))]
    for kernel in KERNELS
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kernels", default="fwd,dkdv,dq", help="of fwd, dkdv, dv, dk, dq")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--tiles", help="BLOCK_M x BLOCK_N tiles to try instead of the defaults, e.g. 64x64,32x128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--configs", help="explicit BLOCK_MxBLOCK_NxWARPSxSTAGES list; a trailing 'h' asks the "
                    "forward for two halves (LaunchConfig.halves)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every config this many times, alternating, and keep each one's best")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    candidates = CANDIDATES_FP32 if dtype == torch.float32 else CANDIDATES
    if args.tiles:
        tiles = [tuple(map(int, t.split("x"))) for t in args.tiles.split(",")]
        grid = list(itertools.product(tiles, map(int, args.warps.split(",")), map(int, args.stages.split(","))))
        candidates = {kernel: [LaunchConfig(m, n, w, st) for (m, n), w, st in grid] for kernel in KERNELS}
    if args.configs:
        explicit = [LaunchConfig.parse(c) for c in args.configs.split(",")]
        candidates = {kernel: explicit for kernel in KERNELS}
    for d in map(int, args.head_dims.split(",")):
        for causal in (c == "1" for c in args.causal.split(",")):
            b, h, s = max(1, 16384 // args.seqlen), 2048 // d, args.seqlen
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            out = flashtile.flash_attn_func(q, k, v, causal=causal)
            dout = torch.randn_like(out)
            fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
            for kernel in args.kernels.split(","):
                if kernel == "fwd":
                    fn = lambda: flashtile.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
                else:
                    fn = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
                flops = fwd_flops * (1.0 if kernel == "fwd" else 2.5)
                best = {}  # config (or "table") -> (ms, note), the best of the rounds
                for _ in range(args.rounds):
                    for cfg in candidates[kernel] + ["table"]:
                        tile_bytes = 0 if cfg == "table" else d * cfg.block_m * cfg.block_n * dtype.itemsize
                        if tile_bytes > 2 * 256 * 64 * 64 and kernel != "fwd" and not (args.tiles or args.configs):
                            continue
                        # whichever launch-table variant the call takes
                        forced = {} if cfg == "table" else {kernel + variant: cfg for variant in VARIANTS}
                        try:
                            with force_config(forced):
                                ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                        except Exception as exc:  # does not fit
                            best[cfg] = (float("inf"), type(exc).__name__)
                            continue
                        if ms < best.get(cfg, (float("inf"),))[0]:
                            best[cfg] = (ms, f"{flops / ms * 1e-9:.0f} TFLOP/s")
                rows = sorted(((ms, cfg, note) for cfg, (ms, note) in best.items()), key=lambda r: r[0])
                print(f"== {kernel} d={d} causal={causal} seqlen={s} (bwd rows time the whole backward)")
                for ms, cfg, note in rows[:8]:
                    print(f"  {ms:8.3f} ms  {cfg if isinstance(cfg, str) else tuple(cfg)}  {note}", flush=True)


if __name__ == "__main__":
    main()
