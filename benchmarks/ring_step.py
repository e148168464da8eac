"""One GPU standing in for a ring: the attention calls that one rank of an R-rank
ring makes at each step (``flashtile.distributed.ring``'s plan, the same op calls
and LSE merges), timed forward and forward+backward, against the time that
step's bytes take on a link. The measured compute per step replaces the cost
model's assumed FLOP rate (docs/guide/context-parallel.md).

    python benchmarks/ring_step.py --out results/ring_step.json            # GPU
    python benchmarks/ring_step.py --small --out /tmp/ring_step.json       # CPU smoke test

A ring step of rank ``r`` at step ``t >= 1`` attends r's queries to the keys of
rank ``r - t``; step 0 (its own keys) is timed apart. Steps after the first are
alike for the zigzag layout, so the middle rank's step 1 stands for them.
Bytes per rank and step: K and V forward; K, V, dK and dV (fp32) backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashtile.distributed.ring import _block_backward, _block_forward, _merge_into, _Settings, plan_steps

# nominal per-direction bandwidths (GB/s) of the links of the cost model
LINKS = {"nvlink_h100": 450.0, "pcie_gen5": 64.0, "infiniband_ndr": 50.0}


class _StandInRing:
    """The rank and world size of one ring member (no process group: nothing is sent)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def _time(fn, device) -> float:
    """Milliseconds of ``fn()``, the median of warm runs."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def step_times(world: int, local_len: int, nheads: int, nheads_k: int, head_dim: int, causal: bool, layout: str,
               dtype, device, step: int) -> dict:
    """Forward and forward+backward milliseconds of one ring step of the middle rank."""
    rank = world // 2
    window = (-1, 0) if causal else (-1, -1)
    settings = _Settings(_StandInRing(rank, world), head_dim ** -0.5, 0.0,
                         plan_steps(_StandInRing(rank, world), layout, local_len, window))
    blocks = settings.steps[step]
    q = torch.randn(1, local_len, nheads, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, local_len, nheads_k, head_dim, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    out = torch.zeros(q.shape, dtype=torch.float32, device=device)
    lse = torch.full((1, nheads, local_len), float("-inf"), dtype=torch.float32, device=device)

    def forward():
        for b in blocks:
            block_out, block_lse = _block_forward(q, k, v, b, settings)
            _merge_into(out[:, b.q_rows], lse[:, :, b.q_rows], block_out, block_lse)

    forward()
    out_q = out.to(dtype)

    def backward():
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=device)
        for b in blocks:
            g = _block_backward(dout, q, k, v, out_q, lse, b, settings)
            dq[:, b.q_rows] += g[0]
            dk[:, b.k_rows] += g[1]
            dv[:, b.k_rows] += g[2]

    def both():
        forward()
        backward()

    # FLOPs as FlashAttention counts them, of the pairs this step's blocks attend
    pairs = 0
    for b in blocks:
        rows = b.q_rows.stop - b.q_rows.start
        keys = b.k_rows.stop - b.k_rows.start
        pairs += rows * keys / (2 if b.window[1] == 0 and b.diag == keys - rows else 1)
    fwd_flops = 4 * pairs * nheads * head_dim
    return {"blocks": len(blocks), "forward_ms": _time(forward, device), "fwd_bwd_ms": _time(both, device),
            "forward_flops": fwd_flops}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4,8", help="ring sizes R")
    ap.add_argument("--local-lens", default="2048,8192,32768", help="tokens per rank")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: as many as --heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--small", action="store_true", help="CPU-sized run (R=2, 64 tokens per rank, 2 heads of 16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    worlds = [2] if args.small else [int(x) for x in args.worlds.split(",")]
    lens = [64] if args.small else [int(x) for x in args.local_lens.split(",")]
    heads, head_dim = (2, 16) if args.small else (args.heads, args.head_dim)
    kv_heads = heads if args.kv_heads is None else args.kv_heads
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    for causal in (False, True):
        for world in worlds:
            for n in lens:
                for step in ((0, 1) if world > 1 else (0,)):
                    t = step_times(world, n, heads, kv_heads, head_dim, causal, args.layout, dtype, device, step)
                    elem = torch.finfo(dtype).bits // 8
                    fwd_bytes = 2 * n * kv_heads * head_dim * elem
                    bwd_bytes = fwd_bytes + 2 * n * kv_heads * head_dim * 4
                    row = dict(causal=causal, world=world, local_len=n, step=step, **t,
                               fwd_tflops=t["forward_flops"] / t["forward_ms"] / 1e9,
                               fwd_bwd_tflops=3.5 * t["forward_flops"] / t["fwd_bwd_ms"] / 1e9,
                               bytes_fwd=fwd_bytes, bytes_fwd_bwd=fwd_bytes + bwd_bytes)
                    # compute time over transfer time of the step's bytes: >= 1 hides the transfer
                    for link, gbs in LINKS.items():
                        row[f"hide_{link}"] = t["fwd_bwd_ms"] / ((fwd_bytes + bwd_bytes) / gbs / 1e6)
                    rows.append(row)
                    print(f"{'causal' if causal else 'full':6s} R={world} n={n:6d} step {step}: fwd "
                          f"{t['forward_ms']:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), fwd+bwd {t['fwd_bwd_ms']:.3f} ms "
                          f"({row['fwd_bwd_tflops']:.0f} TFLOP/s); compute/transfer NVLink "
                          f"{row['hide_nvlink_h100']:.1f}x, IB {row['hide_infiniband_ndr']:.1f}x", flush=True)
    if args.out:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": name, "dtype": str(dtype), "heads": heads, "kv_heads": kv_heads,
                       "head_dim": head_dim, "layout": args.layout, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
