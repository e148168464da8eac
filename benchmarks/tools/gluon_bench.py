"""Time the Gluon forward kernels against the Triton forward on a Hopper GPU
(dense, bf16, (batch, seqlen, heads, dim) inputs); with ``--backward``, the
backward with dK/dV from the Gluon kernel against the Triton backward.

    python benchmarks/tools/gluon_bench.py                          # head dim 128, 1k-16k, causal and not
    python benchmarks/tools/gluon_bench.py --head-dim 64 --kernels ws,simple
    python benchmarks/tools/gluon_bench.py --backward --head-dim 64,128 --heads 16,16

Each row: TFLOP/s of the Triton forward (``attention_forward`` with
FLASHTILE_GLUON=0) and of each Gluon kernel, and the largest difference of
each Gluon output from the Triton one (a quick sanity check; the tests hold the
accuracy rule). Total tokens stay about 16k (batch = 16k / seqlen), 16 heads.
Backward rows: TFLOP/s of the backward alone (2.5x the forward's FLOPs) with
FLASHTILE_GLUON_BWD=0 and =1, and the largest difference of the gradients.
"""

from __future__ import annotations

import argparse
import os

import torch
import triton


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", default="128", help="one head dim (the forward), or several with --backward")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--heads", default="16,16", help="query heads, key/value heads")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--kernels", default="ws,pingpong,simple")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--backward", action="store_true", help="time the backward instead")
    args = ap.parse_args()
    if args.backward:
        return backward(args)

    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.backends.triton.launch.gluon import gluon_forward
    from flashtile.options import AttnOptions

    assert torch.cuda.get_device_capability() == (9, 0), "the Gluon kernels are built for sm90"
    os.environ["FLASHTILE_GLUON"] = "0"  # the baseline: the Triton forward
    heads, heads_k = map(int, args.heads.split(","))
    d = int(args.head_dim)
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


def backward(args):
    """The backward through flash_attn_func (full and causal, ``--causal``), dK/dV by the
    Triton kernels (FLASHTILE_GLUON_BWD=0), by the Gluon kernel (=1) and, for full
    attention, by its warp-specialised form (FLASHTILE_GLUON_BWD_KERNEL=ws)."""
    import flashtile

    assert torch.cuda.get_device_capability() == (9, 0), "the Gluon kernels are built for sm90"
    heads, heads_k = map(int, args.heads.split(","))
    print(f"{torch.cuda.get_device_name()}, heads {heads}/{heads_k}, bf16; backward TFLOP/s "
          "(max |gluon - triton| of dq, dk, dv)")
    print(f"{'causal':>6} {'dim':>4} {'seqlen':>6} {'batch':>5} {'triton':>8} {'gluon dk/dv':>12} {'ratio':>6} "
          f"{'ws (full only)':>16}  diff")
    cases = [(causal, d, seqlen) for causal in (bool(int(c)) for c in args.causal.split(","))
             for d in (int(x) for x in args.head_dim.split(","))
             for seqlen in (int(n) for n in args.seqlens.split(","))]
    for causal, d, seqlen in cases:
        batch = max(1, args.tokens // seqlen)
        q = torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, seqlen, heads_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, seqlen, heads_k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = flashtile.flash_attn_func(q, k, v, causal=causal)
        dout = torch.randn_like(out)
        flops = 2.5 * 4 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)
        speed, grads = {}, {}
        for flag in ("0", "1", "ws"):
            if flag == "ws" and causal:
                continue
            os.environ["FLASHTILE_GLUON_BWD"] = "0" if flag == "0" else "1"
            os.environ["FLASHTILE_GLUON_BWD_KERNEL"] = "ws" if flag == "ws" else "simple"

            def step():
                return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

            grads[flag] = step()
            speed[flag] = flops / triton.testing.do_bench(step, warmup=50, rep=200) * 1e-9
        diff = max((a.float() - b.float()).abs().max().item() for g in grads.values() for a, b in zip(grads["0"], g))
        ws = f"{speed['ws']:>8.1f} ({speed['ws'] / speed['0']:.2f}x)" if "ws" in speed else f"{'-':>16}"
        print(f"{int(causal):>6} {d:>4} {seqlen:>6} {batch:>5} {speed['0']:>8.1f} {speed['1']:>12.1f} "
              f"{speed['1'] / speed['0']:>5.2f}x {ws}  {diff:.1e}", flush=True)
    os.environ.pop("FLASHTILE_GLUON_BWD", None)
    os.environ.pop("FLASHTILE_GLUON_BWD_KERNEL", None)


if __name__ == "__main__":
    main()
