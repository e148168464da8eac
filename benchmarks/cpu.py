"""flashtile on the CPU against PyTorch's SDPA as a user calls it (both on the same
``(batch, heads, seqlen, headdim)`` tensors; flashtile's flash_attn function on
its own layout beside them), alternated in one
process over several rounds in a new order each round (a shared CPU's speed
drifts between runs), median of the rounds, and the median of the rounds'
flashtile / SDPA ratios; beside them options PyTorch lacks on the CPU: a sliding window
(PyTorch's kernel with a mask, chunk by chunk, and for comparison the tiled path) and
softcap (the tiled path).

    python benchmarks/cpu.py --seqlens 1024,4096 --out bench_results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU tensors: flashtile's CPU path

import torch  # noqa: E402

import flashtile  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def on_tiled_path(fn):
    """``fn`` timed with every CPU call on the tiled path (batch-invariant mode takes it)."""
    fn.tiled = True
    return fn


def timed(fn, backward: bool) -> float:
    previous = flashtile.set_batch_invariant(True) if getattr(fn, "tiled", False) else None
    try:
        start = time.perf_counter()
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        return (time.perf_counter() - start) * 1e3
    finally:
        if previous is not None:
            flashtile.set_batch_invariant(previous)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="bench_results/cpu.json")
    args = ap.parse_args(argv)
    rows = []
    order = random.Random(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.heads} heads, "
          f"head dim {args.head_dim}; median of {args.rounds} alternating rounds, ms")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for s in map(int, args.seqlens.split(",")):
            for causal in (False, True):
                q, k, v = (torch.randn(1, s, args.heads, args.head_dim, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                # flashtile's SDPA function on the very tensors PyTorch's gets, and its flash_attn
                # function on its own layout
                fns = {"flashtile": lambda: flashtile.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                       "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                       "flashtile flash_attn layout": lambda: flashtile.flash_attn_func(q, k, v, causal=causal)}
                if dtype_name == "fp32" and causal:  # options PyTorch lacks
                    def window():
                        return flashtile.flash_attn_func(q, k, v, causal=True, window_size=(256, 0))

                    fns["flashtile window 256"] = window
                    fns["flashtile window 256, tiled path"] = on_tiled_path(lambda: window())
                    fns["flashtile softcap"] = lambda: flashtile.flash_attn_func(q, k, v, causal=True, softcap=30.0)
                for mode in ("fwd", "fwd_bwd"):
                    times = {name: [] for name in fns}
                    for name, fn in fns.items():  # warm-up
                        timed(fn, mode == "fwd_bwd")
                    for _ in range(args.rounds):
                        # a new order each round: no function always runs right after another
                        for name in order.sample(list(fns), len(fns)):
                            times[name].append(timed(fns[name], mode == "fwd_bwd"))
                    med = {name: statistics.median(t) for name, t in times.items()}
                    # the ratio of each round's pair, whose two calls saw the same load, then their median
                    ratio = statistics.median(a / b for a, b in zip(times["flashtile"], times["sdpa"]))
                    row = dict(dtype=dtype_name, seqlen=s, causal=causal, mode=mode, ms=med, ratio=ratio)
                    rows.append(row)
                    print(f"{dtype_name} s={s} {'causal' if causal else 'full'} {mode}: " +
                          ", ".join(f"{n} {m:.1f}" for n, m in med.items()) + f"; flashtile / sdpa {row['ratio']:.3f}x",
                          flush=True)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), heads=args.heads,
                                    head_dim=args.head_dim, rounds=args.rounds, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
