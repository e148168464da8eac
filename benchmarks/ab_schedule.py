"""Causal attention with the grid's last waves issued longest first across heads
(``launch.LONGEST_FIRST_WAVES``) against the plain head-by-head order, in one
process, alternating, with SDPA flash timed alongside for the ratio:

    python benchmarks/ab_schedule.py --out ab_schedule.json

bf16, hidden 2048, 16k tokens per batch (the standard grid's causal cells);
prints TFLOP/s of the forward and forward+backward per (head dim, seqlen).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashtile
from flashtile.api import launch


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_pair(fn, inputs):
    """(forward ms, forward+backward ms) of ``fn(*inputs)``."""
    with torch.no_grad():
        fwd = median_ms(lambda: fn(*inputs))
    grad = torch.randn_like(fn(*inputs))
    return fwd, median_ms(lambda: fn(*inputs).backward(grad))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    waves_on = launch.LONGEST_FIRST_WAVES
    rows = []
    for head_dim in map(int, args.head_dims.split(",")):
        nheads = 2048 // head_dim
        for seqlen in map(int, args.seqlens.split(",")):
            batch = 16384 // seqlen
            q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            flops = 4.0 * batch * nheads * seqlen * seqlen * head_dim / 2

            def ft(q, k, v):
                return flashtile.flash_attn_func(q, k, v, causal=True)

            def sdpa(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            times = {"head_order": [], "longest_first": [], "sdpa_flash": []}
            for _ in range(args.rounds):
                for tag, waves in (("head_order", 0), ("longest_first", waves_on)):
                    launch.LONGEST_FIRST_WAVES = waves
                    times[tag].append(time_pair(ft, (q, k, v)))
                times["sdpa_flash"].append(time_pair(sdpa, (qt, kt, vt)))
            launch.LONGEST_FIRST_WAVES = waves_on
            row = dict(head_dim=head_dim, seqlen=seqlen, batch=batch, nheads=nheads)
            for tag, pairs in times.items():
                row[tag] = dict(fwd=flops / min(p[0] for p in pairs) * 1e-9,
                                fwd_bwd=3.5 * flops / min(p[1] for p in pairs) * 1e-9)
            rows.append(row)
            print(f"d{head_dim} {seqlen:6}: " + "  ".join(
                f"{tag} fwd {r['fwd']:5.0f} fwd+bwd {r['fwd_bwd']:5.0f}" for tag, r in row.items()
                if isinstance(r, dict)) + "  gain fwd {:.3f} fwd+bwd {:.3f}".format(
                row["longest_first"]["fwd"] / row["head_order"]["fwd"],
                row["longest_first"]["fwd_bwd"] / row["head_order"]["fwd_bwd"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
