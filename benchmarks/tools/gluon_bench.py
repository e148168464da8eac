"""Time the Gluon forward kernels against the Triton forward on a Hopper GPU
(forward only, dense, bf16, (batch, seqlen, heads, dim) inputs).

    python benchmarks/tools/gluon_bench.py                          # head dim 128, 1k-16k, causal and not
    python benchmarks/tools/gluon_bench.py --head-dim 64 --kernels ws,simple

Each row: TFLOP/s of the Triton forward (``attention_forward`` with
FLASHTILE_GLUON=0) and of each Gluon kernel, and the largest difference of
each Gluon output from the Triton one (a quick sanity check; the tests hold the
accuracy rule). Total tokens stay about 16k (batch = 16k / seqlen), 16 heads.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--heads", default="16,16", help="query heads, key/value heads")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--kernels", default="ws,pingpong,simple")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()

    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.backends.triton.launch.gluon import gluon_forward
    from flashtile.options import AttnOptions

    assert torch.cuda.get_device_capability() == (9, 0), "the Gluon kernels are built for sm90"
    os.environ["FLASHTILE_GLUON"] = "0"  # the baseline: the Triton forward
    heads, heads_k = map(int, args.heads.split(","))
    d = args.head_dim
    kernels = args.kernels.split(",")
    print(f"{torch.cuda.get_device_name()}, head dim {d}, heads {heads}/{heads_k}, bf16; TFLOP/s (max |gluon - triton|)")
    print(f"{'causal':>6} {'seqlen':>6} {'batch':>5} {'triton':>8} " + " ".join(f"{k:>18}" for k in kernels))
    for causal in (bool(int(c)) for c in args.causal.split(",")):
        for seqlen in (int(s) for s in args.seqlens.split(",")):
            batch = max(1, args.tokens // seqlen)
            q = torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, seqlen, heads_k, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(batch, seqlen, heads_k, d, device="cuda", dtype=torch.bfloat16)
            opts = AttnOptions(softmax_scale=d ** -0.5, window_right=0 if causal else -1)
            flops = 4 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)

            def tflops(fn):
                return flops / triton.testing.do_bench(fn, warmup=50, rep=200) * 1e-9

            ref, _ = launch_attention.attention_forward(q, k, v, opts)
            row = f"{int(causal):>6} {seqlen:>6} {batch:>5} {tflops(lambda: launch_attention.attention_forward(q, k, v, opts)):>8.1f} "
            cells = []
            for kernel in kernels:
                out, _ = gluon_forward(q, k, v, d ** -0.5, causal, kernel=kernel)
                diff = (out.float() - ref.float()).abs().max().item()
                speed = tflops(lambda: gluon_forward(q, k, v, d ** -0.5, causal, kernel=kernel))
                cells.append(f"{speed:>8.1f} ({diff:.1e})")
            print(row + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
