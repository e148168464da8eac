"""Command line: ``flashtile bench | bench train | info | check`` and
``flashtile --version`` (also ``python -m flashtile ...``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main"]

DTYPE_NAMES = ("bf16", "fp16", "fp32")
MODE_NAMES = ("fwd", "bwd", "fwd_bwd")
PROVIDER_NAMES = ("flashtile", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex")


def _list_of(kind, choices=None, minimum=None):
    """An argparse type: a comma list of ``kind`` values, each checked, so that a bad
    value is an argparse error (exit code 2) naming it, before anything runs."""
    def parse(text: str) -> list:
        values = []
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            try:
                value = kind(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not a{'n int' if kind is int else ' ' + kind.__name__}")
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, choices))}")
            if minimum is not None and value < minimum:
                raise argparse.ArgumentTypeError(f"{item!r} must be at least {minimum}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError("an empty list")
        return values
    return parse


def _causal_list(text: str) -> list[bool]:
    return [v == 1 for v in _list_of(int, choices=(0, 1))(text)]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive int")
    return value


def _version() -> str:
    from .. import __version__

    return f"flashtile {__version__}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashtile", description="flashtile: FlashAttention for PyTorch in Triton")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser(
        "bench", help="time flashtile against PyTorch SDPA backends and FlexAttention",
        description="On a GPU: the standard grid (bf16 and fp16, head dims 64/128/256, hidden 2048, 16k tokens per "
                    "batch, seqlen 512-16k) against SDPA's flash, cuDNN, efficient and math backends and "
                    "FlexAttention. On a CPU (or with --cpu): fp32, head dim 64, hidden 256, 2k tokens per batch, "
                    "seqlen 256-2k, against PyTorch's SDPA and its math backend. Results: bench.json and bench.png "
                    "in --out.",
        epilog="flashtile bench train [options]: a GPT-2 style model trained end to end with each attention "
               "backend, measured (see flashtile bench train --help).")
    bench.add_argument("--dtypes", type=_list_of(str, DTYPE_NAMES),
                       help="comma list of bf16,fp16,fp32 (default: GPU bf16,fp16; CPU fp32)")
    bench.add_argument("--head-dims", type=_list_of(int, minimum=1),
                       help="comma list (default: GPU 64,128,256; CPU 64)")
    bench.add_argument("--seqlens", type=_list_of(int, minimum=1),
                       help="comma list (default: GPU 512,1024,...,16384; CPU 256,512,1024,2048)")
    bench.add_argument("--causal", type=_causal_list, default=[False, True], help="0, 1 or 0,1 (default: both)")
    bench.add_argument("--modes", type=_list_of(str, MODE_NAMES), help="comma list of fwd,bwd,fwd_bwd (default: all)")
    bench.add_argument("--providers", type=_list_of(str, PROVIDER_NAMES),
                       help="comma list of " + ",".join(PROVIDER_NAMES) + " (default: GPU flashtile,sdpa_flash,"
                            "sdpa_cudnn,sdpa_efficient,sdpa_math,flex; CPU flashtile,sdpa,sdpa_math)")
    bench.add_argument("--hidden", type=_positive, default=None,
                       help="nheads * headdim (default: GPU 2048, CPU 256)")
    bench.add_argument("--tokens", type=_positive, default=None,
                       help="batch * seqlen (default: GPU 16384, CPU 2048)")
    bench.add_argument("--cpu", action="store_true", help="run the CPU benchmark even if a GPU is present")
    bench.add_argument("--graph", action="store_true",
                       help="GPU: also time each call as CUDA-graph replays (the GPU alone, no host time); "
                            "in bench.json as extra.graph_ms")
    bench.add_argument("--out", default="bench_results", help="folder for bench.json and bench.png "
                                                              "(default: bench_results)")
    sub.add_parser("info", help="this machine: device, versions, which kernels and features run here and why",
                   description="Device, torch/triton versions, the backend each kind of call takes here and why "
                               "not the others, where launch configurations come from, and the integrations "
                               "available.")
    check = sub.add_parser("check", help="a quick self-test of the main public functions against the oracle",
                           description="Runs the main public functions on small random inputs on this machine's "
                                       "device (--device to choose) and compares it with the materialised "
                                       "oracle; exit code 1 if any check fails.")
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "train"]:  # the training benchmark parses its own arguments
        from .train import run
        return run(argv[2:])
    args = parser.parse_args(argv)
    if args.command is None:  # "flashtile" alone: the benchmark, as before the subcommands
        args = parser.parse_args(["bench", *argv])
    if args.command == "bench":
        from .bench import run
        run(args)
        return 0
    if args.command == "info":
        from .info import print_info
        print_info()
        return 0
    if args.command == "check":
        from .check import run_checks
        return 0 if run_checks(args.device) else 1
    return 0
