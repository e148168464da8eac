"""What opt-in autotuning costs once and gains after, against the launch table.

For each case: forward+backward time with the table's configs, the time of
the first call with autotuning on (every kernel variant tuned), and the time
after tuning; the choices go to a temporary cache file.

    python benchmarks/autotune_gain.py --cases 128:2048:1,64:1024:0
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import flashtile
from flashtile.api import launch
from flashtile.bench import median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="128:2048:1,64:1024:0", help="head_dim:seqlen:causal, comma-separated")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp()) / "autotune.json"
    for case in args.cases.split(","):
        d, s, causal = (int(x) for x in case.split(":"))
        b, h = max(1, 16384 // s), 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def step():
            out = flashtile.flash_attn_func(q, k, v, causal=bool(causal))
            torch.autograd.grad(out, (q, k, v), dout)

        flops = 3.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        flashtile.set_autotune(False)
        launch.clear_caches()
        table_ms = median_ms(step, cuda=True)
        flashtile.set_autotune(True, cache)
        launch.clear_caches()
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        tune_s = time.perf_counter() - start
        tuned_ms = median_ms(step, cuda=True)
        chosen = {key[0]: tuple(cfg) for key, cfg in launch._chosen.items() if key[-1] is not None}
        print(f"d{d} s{s} causal={causal}: table {flops / table_ms * 1e-9:.0f} TFLOP/s, first call with tuning "
              f"{tune_s:.0f} s, tuned {flops / tuned_ms * 1e-9:.0f} TFLOP/s ({table_ms / tuned_ms:.3f}x) {chosen}",
              flush=True)
    flashtile.set_autotune(False)


if __name__ == "__main__":
    main()
