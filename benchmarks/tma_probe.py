"""When do tensor descriptors (TMA) pay in the forward kernel? Times the
forward with ``FLASHTILE_FWD_TMA=0`` and ``=1`` over batch sizes and sequence
lengths separately (the standard grid moves both at once).

    python benchmarks/tma_probe.py
"""

import os

import torch
from triton.testing import do_bench

import flashtile

SHAPES = [(32, 512), (4, 512), (1, 512), (16, 1024), (2, 1024), (8, 2048), (32, 2048), (4, 4096), (1, 8192)]


def main():
    print("head_dim causal batch seqlen | pointer ms TFLOP/s | tma ms TFLOP/s | tma/pointer")
    for d in (64, 128, 256):
        h = 2048 // d
        for causal in (False, True):
            for b, s in SHAPES:
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                row = []
                for tma in ("0", "1"):
                    os.environ["FLASHTILE_FWD_TMA"] = tma
                    ms = do_bench(lambda: flashtile.flash_attn_func(q, k, v, causal=causal), warmup=25, rep=100,
                                  return_mode="median")
                    row.append((ms, flops / ms * 1e-9))
                print(f"{d:4d} {int(causal)} {b:3d} {s:6d} | {row[0][0]:8.3f} {row[0][1]:5.0f} | "
                      f"{row[1][0]:8.3f} {row[1][1]:5.0f} | {row[0][0] / row[1][0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
