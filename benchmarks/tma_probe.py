"""When do tensor descriptors (TMA) pay in the forward kernel? Times the
forward with ``FLASHTILE_FWD_TMA=0`` (pointers), ``=1`` (descriptors built in
the kernel) and ``=2`` (built on the host) over batch sizes and sequence
lengths separately (the standard grid moves both at once).

    python benchmarks/tma_probe.py
"""

import os

import torch
from triton.testing import do_bench

import flashtile

SHAPES = [(32, 512), (4, 512), (1, 512), (16, 1024), (2, 1024), (8, 2048), (32, 2048), (4, 4096), (1, 8192)]


def main():
    print("head_dim causal batch seqlen | TFLOP/s: pointers, in-kernel descriptors, host descriptors")
    for d in (64, 128, 256):
        h = 2048 // d
        for causal in (False, True):
            for b, s in SHAPES:
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                row = []
                for tma in ("0", "1", "2"):
                    os.environ["FLASHTILE_FWD_TMA"] = tma
                    ms = do_bench(lambda: flashtile.flash_attn_func(q, k, v, causal=causal), warmup=25, rep=100,
                                  return_mode="median")
                    row.append((ms, flops / ms * 1e-9))
                print(f"{d:4d} {int(causal)} {b:3d} {s:6d} | " + " ".join(f"{t:5.0f}" for _, t in row), flush=True)


if __name__ == "__main__":
    main()
