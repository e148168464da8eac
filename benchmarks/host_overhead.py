"""Host-side cost of one attention call: what Python and the launches take
before the GPU has work, against PyTorch SDPA's flash backend.

At short sequences the GPU finishes a call faster than the host can issue the
next one, so the host time per call is the floor of the measured time. This
script times calls back to back on tiny inputs (GPU work negligible: the time
per call is the host's) and, with ``--profile``, prints where flashtile's
host time goes (cProfile, by own time).

    python benchmarks/host_overhead.py --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import flashtile
from flashtile.cli.bench import graph_ms


def enqueue_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn`` issued back to back without waiting for the GPU
    (fewer calls than the launch queue holds: the host's time alone; median of 5 rounds)."""
    rounds = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds[1:])[2]


def per_call_us(fn, calls: int = 2000) -> float:
    """Microseconds per call of ``fn`` issued back to back (median of 5 rounds)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def cases(b: int, s: int, h: int, d: int, causal: bool):
    """name -> zero-argument function, for flashtile and SDPA flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    qt, kt, vt = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout, dout_t = torch.randn_like(q), torch.randn_like(qt)

    def ft_fwd():
        return flashtile.flash_attn_func(q, k, v, causal=causal)

    def ft_fwd_nograd():
        with torch.no_grad():
            return flashtile.flash_attn_func(q, k, v, causal=causal)

    def ft_fwd_bwd():
        ft_fwd().backward(dout)

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        sdpa_fwd().backward(dout_t)

    return {"flashtile fwd": ft_fwd, "flashtile fwd (no grad)": ft_fwd_nograd, "flashtile fwd+bwd": ft_fwd_bwd,
            "sdpa_flash fwd": sdpa_fwd, "sdpa_flash fwd+bwd": sdpa_fwd_bwd}


def grid_cases() -> None:
    """The standard grid's 1k cases: eager calls against CUDA-graph replays (GPU alone)."""
    from triton.testing import do_bench

    print("\nstandard-grid cases at seqlen 1k (b16, hidden 2048, bf16): ms per call issued eagerly,"
          " ms per CUDA-graph replay (GPU alone)")
    for d in (64, 128, 256):
        for causal in (False, True):
            fns = cases(16, 1024, 2048 // d, d, causal)
            for name in ("flashtile fwd", "sdpa_flash fwd", "flashtile fwd+bwd", "sdpa_flash fwd+bwd"):
                eager = do_bench(fns[name], warmup=25, rep=100, return_mode="median")
                try:
                    graph = graph_ms(fns[name])
                except RuntimeError as exc:  # not capturable
                    print(f"  ({name}: no CUDA graph: {exc})")
                    graph = float("nan")
                print(f"  d{d:<3d} {'causal' if causal else 'full  '} {name:20s} eager {eager:7.4f}  graph {graph:7.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="cProfile flashtile's forward and forward+backward")
    ap.add_argument("--grid", action="store_true", help="also the standard grid's 1k cases, eager and graphed")
    args = ap.parse_args()
    fns = cases(1, 128, 2, 128, causal=True)
    print("host time per call, tiny inputs (b1, s128, h2, d128, causal, bf16):")
    for name, fn in fns.items():
        print(f"  {name:26s} {per_call_us(fn):7.1f} us  (enqueue alone {enqueue_us(fn):7.1f} us)")
    if args.grid:
        grid_cases()
    if args.profile:
        for name in ("flashtile fwd", "flashtile fwd+bwd"):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(2000):
                fns[name]()
            torch.cuda.synchronize()
            profile.disable()
            print(f"\n== cProfile, 2000 calls of {name}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
