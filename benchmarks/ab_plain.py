"""Plain attention (no options) of one flashtile tree with every launch forced to
one common table, so two trees (e.g. before and after a kernel edit) can be
compared kernel for kernel, pointer loads in the backward:

    PYTHONPATH=old_tree python benchmarks/ab_plain.py --tag old --out ab_old.json
    PYTHONPATH=.        python benchmarks/ab_plain.py --tag new --out ab_new.json

Run the trees alternately, several rounds: run-to-run noise is a few percent.
bf16, hidden 2048, 16k tokens per batch; prints TFLOP/s per (head dim, causal,
seqlen, mode).
"""

import argparse
import json
import os

os.environ.setdefault("FLASHTILE_BWD_TMA", "0")  # the tree before descriptors had none in the backward

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import flashtile  # noqa: E402
from flashtile.api import launch  # noqa: E402
from flashtile.kernels.configs import LaunchConfig as C  # noqa: E402

# only what every tree has (older trees lack flashtile.bench.median_ms)
def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


# the Hopper table of the commit before the option switches (forward through descriptors)
TABLE = {
    64: dict(fwd=C(128, 128, 4, 3), dkdv=C(64, 64, 4, 2), dq=C(128, 64, 8, 2)),
    128: dict(fwd=C(128, 128, 8, 3), dkdv=C(64, 64, 4, 2), dq=C(64, 64, 4, 2)),
}


def force(head_dim: int) -> None:
    t = TABLE[head_dim]
    launch.forced_configs.clear()
    for suffix in ("", "_causal", "_causal_short", "_short", "_window"):
        launch.forced_configs["fwd_tma" + suffix] = t["fwd"]
        launch.forced_configs["fwd" + suffix] = t["fwd"]
        launch.forced_configs["dkdv" + suffix] = t["dkdv"]
        launch.forced_configs["dq" + suffix] = t["dq"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seqlens", default="4096,16384")
    args = ap.parse_args()
    os.environ.setdefault("FLASHTILE_FWD_TMA", "1")
    rows = []
    for head_dim in (64, 128):
        force(head_dim)
        nheads = 2048 // head_dim
        for causal in (False, True):
            for seqlen in map(int, args.seqlens.split(",")):
                batch = 16384 // seqlen
                q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                flops = 4.0 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
                with torch.no_grad():
                    fwd = median_ms(lambda: flashtile.flash_attn_func(q, k, v, causal=causal))
                out = flashtile.flash_attn_func(q, k, v, causal=causal)
                grad = torch.randn_like(out)

                def step():
                    flashtile.flash_attn_func(q, k, v, causal=causal).backward(grad)
                fwd_bwd = median_ms(step)
                row = dict(tag=args.tag, head_dim=head_dim, causal=causal, seqlen=seqlen,
                           fwd=flops / fwd * 1e-9, fwd_bwd=3.5 * flops / fwd_bwd * 1e-9)
                rows.append(row)
                print(f"{args.tag:>6} d{head_dim} {'causal' if causal else 'full':6} {seqlen:6}: "
                      f"fwd {row['fwd']:6.1f}  fwd+bwd {row['fwd_bwd']:6.1f} TFLOP/s", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
