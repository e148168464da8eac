"""What the options cost and save, on a GPU: variable-length packing against a
padded batch, sliding window against full attention, and the plain kernels
with and without the option switches compiled in.

    python benchmarks/features.py --out results/features.json

Times are medians of warm runs (``triton.testing.do_bench``), bf16, head dim
128; every ratio compares providers measured in the same run.
"""

import argparse
import json
import random

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import flashtile


def bench(fn, backward: bool) -> float:
    """Milliseconds of fn() (forward) or of forward+backward."""
    if not backward:
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def step():
        out = fn()
        out.backward(torch.ones_like(out))
    return do_bench(step, warmup=25, rep=100, return_mode="median")


def varlen_vs_padded(batch=16, nheads=16, head_dim=128, lo=128, hi=4096, seed=0):
    """Lengths uniform in [lo, hi]: flashtile varlen on the packed tokens against
    SDPA on the padded batch (flash: no mask possible, so it computes the padding
    too; efficient and cuDNN: with the key-padding mask)."""
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(batch)]
    total, max_len = sum(lens), max(lens)
    dev, dt = "cuda", torch.bfloat16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(total, nheads, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    qp, kp, vp = (torch.randn(batch, nheads, max_len, head_dim, device=dev, dtype=dt, requires_grad=True)
                  for _ in range(3))
    keep = torch.arange(max_len, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    mask = keep[:, None, None, :]
    rows = []
    for causal in (False, True):
        for backward in (False, True):
            row = dict(causal=causal, mode="fwd_bwd" if backward else "fwd")
            row["flashtile_varlen"] = bench(lambda: flashtile.flash_attn_varlen_func(
                q, k, v, cu, cu, max_len, max_len, causal=causal), backward)
            row["flashtile_padded_mask"] = bench(lambda: flashtile.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=None if causal else mask, is_causal=causal), backward)
            for name, backend in (("sdpa_flash_padded", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa_efficient_padded_mask", SDPBackend.EFFICIENT_ATTENTION),
                                  ("sdpa_cudnn_padded_mask", SDPBackend.CUDNN_ATTENTION)):
                m = None if (causal or backend == SDPBackend.FLASH_ATTENTION) else mask
                try:
                    with sdpa_kernel(backend):
                        row[name] = bench(lambda: F.scaled_dot_product_attention(
                            qp, kp, vp, attn_mask=m, is_causal=causal), backward)
                except RuntimeError as exc:  # backend refuses this input
                    row[name] = f"n/a: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
            print(row, flush=True)
    return dict(lengths=lens, nheads=nheads, head_dim=head_dim, rows=rows)


def window_vs_full(seqlen=32768, nheads=16, head_dim=128, window=4096):
    """Sliding window against full attention at one long sequence."""
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    cases = {
        "causal_full": dict(causal=True),
        f"causal_window_{window}": dict(causal=True, window_size=(window, 0)),
        "full": dict(),
        f"window_{window // 2}_{window // 2}": dict(window_size=(window // 2, window // 2)),
    }
    rows = []
    for backward in (False, True):
        row = dict(mode="fwd_bwd" if backward else "fwd")
        for name, kw in cases.items():
            row[name] = bench(lambda: flashtile.flash_attn_func(q, k, v, **kw), backward)
        # the same full causal attention in SDPA's flash backend (FlashAttention-2), which has no window
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["sdpa_flash_causal_full"] = bench(lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True), backward)
        rows.append(row)
        print(row, flush=True)
    return dict(seqlen=seqlen, nheads=nheads, head_dim=head_dim, window=window, rows=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="features.json")
    ap.add_argument("--parts", default="varlen,window", help="comma list of varlen, window")
    args = ap.parse_args()
    parts = args.parts.split(",")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if "varlen" in parts:
        result["varlen"] = varlen_vs_padded()
    if "window" in parts:
        result["window"] = window_vs_full()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
