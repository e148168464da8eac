"""Command line: ``flashtile bench`` (also ``python -m flashtile bench``)."""

from __future__ import annotations

import argparse


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashtile", description="flashtile: FlashAttention for PyTorch in Triton")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="time flashtile against PyTorch SDPA backends and FlexAttention")
    bench.add_argument("--dtypes", type=_strs, help="comma list of bf16,fp16,fp32 (GPU default bf16,fp16)")
    bench.add_argument("--head-dims", type=_ints, help="comma list (GPU default 64,128,256)")
    bench.add_argument("--seqlens", type=_ints, help="comma list (GPU default 512..16384)")
    bench.add_argument("--causal", type=lambda t: [{"0": False, "1": True}[x] for x in t.split(",")],
                       default=[False, True], help="0, 1 or 0,1 (default both)")
    bench.add_argument("--modes", type=_strs, help="comma list of fwd,bwd,fwd_bwd (default all)")
    bench.add_argument("--providers", type=_strs,
                       help="comma list of flashtile,sdpa_flash,sdpa_cudnn,sdpa_efficient,sdpa_math,flex")
    bench.add_argument("--hidden", type=int, default=2048, help="nheads * headdim (default 2048)")
    bench.add_argument("--tokens", type=int, default=16384, help="batch * seqlen (default 16384)")
    bench.add_argument("--cpu", action="store_true", help="run the CPU benchmark even if a GPU is present")
    bench.add_argument("--graph", action="store_true",
                       help="GPU: also time each call as CUDA-graph replays (the GPU alone, no host time); "
                            "in bench.json as extra.graph_ms")
    bench.add_argument("--out", default="bench_results", help="folder for bench.json and bench.png")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["bench", *(argv or [])])
    if args.command == "bench":
        from .bench import run
        run(args)
    return 0
