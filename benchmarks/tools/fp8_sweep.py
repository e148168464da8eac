"""The FP8 forward's variants on a GPU, in one run: V as given or sequence-major
(``FLASHTILE_FP8_V``), and launch configurations forced on every forward launch,
against flashtile's bf16 forward on the same inputs (head dim 128, hidden 2048, 16k
tokens, block scales). TFLOP/s, and the largest difference to the bf16 output.

    python benchmarks/tools/fp8_sweep.py --out fp8_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from flashtile import flash_attn_func
from flashtile.backends.triton.launch.attention import FORWARD_NAMES
from flashtile.backends.triton.launch.choose import force_config
from flashtile.backends.triton.launch.table import LaunchConfig
from flashtile.fp8 import quantize_qkv

CONFIGS = ["256x64x8x3h", "128x128x8x3", "128x128x8x2", "128x64x8x3"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="4096:0,16384:0,16384:1", help="seqlen:causal, comma separated")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="BLOCK_MxBLOCK_NxWARPSxSTAGES[h], comma separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(torch.cuda.get_device_name())
    rows = []
    for cell in args.cells.split(","):
        seqlen, causal = int(cell.split(":")[0]), cell.split(":")[1] == "1"
        head_dim, nheads = 128, 16
        batch = max(1, 16384 // seqlen)
        q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * nheads * seqlen * seqlen * head_dim / (2 if causal else 1)
        ref = flash_attn_func(q, k, v, causal=causal)
        row = dict(seqlen=seqlen, causal=causal,
                   bf16=flops / do_bench(lambda: flash_attn_func(q, k, v, causal=causal)) / 1e9)
        q8, k8, v8, qd, kd, vd = quantize_qkv(q, k, v, scaling="block", incoherent=False)

        def fp8():
            return flash_attn_func(q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)

        for layout in ("row", "seq"):
            os.environ["FLASHTILE_FP8_V"] = layout
            row[f"fp8_{layout}"] = flops / do_bench(fp8) / 1e9
            row[f"diff_{layout}"] = (fp8().float() - ref.float()).abs().max().item()
        os.environ.pop("FLASHTILE_FP8_V")
        for text in args.configs.split(","):
            try:
                with force_config(LaunchConfig.parse(text), FORWARD_NAMES):
                    row[f"fp8_{text}"] = flops / do_bench(fp8) / 1e9
            except Exception as exc:  # a config that does not fit this GPU
                row[f"fp8_{text}"] = repr(exc)[:80]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
