"""FP8 attention: accuracy of the FP8 forward against bf16 attention, with and
without incoherent processing, and (on a GPU) its speed.

    python benchmarks/fp8.py --out results/fp8.json            # accuracy (GPU sizes on a GPU)
    python benchmarks/fp8.py --speed --out results/fp8.json    # and speed (GPU only)
    python benchmarks/fp8.py --small --device cpu --out fp8.json

Accuracy: the RMSE and largest absolute error against fp64 attention
(``flashtile.testing.attention_ref``) on the same bf16 inputs of

* ``bf16``: ``flash_attn_func`` in bf16;
* ``fp8_tensor``, ``fp8_block``: ``flash_attn_fp8_func`` with per-tensor or
  per-block (128 positions) scales, no rotation;
* ``fp8_tensor_incoherent``, ``fp8_block_incoherent``: the same after the
  random Hadamard rotation of q and k,

on ``normal`` inputs (``randn``) and on ``outliers`` inputs: ``randn`` with a few
channels of q and k scaled by 10 to 100 (the case of FlashAttention-3's
evaluation), causal and not. On the outlier inputs the softmax scale gives the
scores unit standard deviation (with ``1 / sqrt(headdim)`` the outlier channels
alone would make every row's softmax one-hot).

Speed (``--speed``): ``flash_attn_func`` on pre-quantised FP8 inputs (block and
tensor scales) against bf16 ``flash_attn_func`` at head dim 128, hidden 2048 (16
heads), 16k tokens per batch (batch = 16384 / seqlen), seqlen 1k to 16k, causal
and not, in TFLOP/s (``4 * batch * heads * seqlen^2 * headdim``, halved when
causal); and ``quantize_qkv``'s own cost in ms and GB/s (bf16 read, fp8 written).
Times are medians of warm runs (``triton.testing.do_bench``).

Needs ``flash_attn_func``'s FP8 forward (its ``q_descale`` argument); the script
stops with a message where that is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

import flashtile
from flashtile.fp8 import flash_attn_fp8_func, quantize_qkv
from flashtile.testing import attention_ref

VARIANTS = {
    "fp8_tensor": dict(scaling="tensor", incoherent=False),
    "fp8_block": dict(scaling="block", incoherent=False),
    "fp8_tensor_incoherent": dict(scaling="tensor", incoherent=True),
    "fp8_block_incoherent": dict(scaling="block", incoherent=True),
}


def make_inputs(kind: str, batch: int, seqlen: int, nheads: int, head_dim: int, device: str, seed: int = 0,
                n_outliers: int | None = None):
    """bf16 q, k, v ``(batch, seqlen, nheads, head_dim)``; ``kind="outliers"``: ``n_outliers``
    channels (default one in 32) of q and k, the same ones, scaled by factors from 10 to 100."""
    if n_outliers is None:
        n_outliers = max(1, head_dim // 32)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, generator=gen) for _ in range(3))
    if kind == "outliers":
        channels = torch.randperm(head_dim, generator=gen)[:min(n_outliers, head_dim)]
        factors = 10 + 90 * torch.rand(len(channels), generator=gen)
        q[..., channels] *= factors
        k[..., channels] *= factors
    elif kind != "normal":
        raise ValueError(f"unknown input kind {kind!r}")
    return tuple(t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v))


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    err = out.double() - ref
    return dict(rmse=err.pow(2).mean().sqrt().item(), max_abs_err=err.abs().max().item(),
                rel_rmse=(err.norm() / ref.norm()).item())


def outlier_scale(q: torch.Tensor, k: torch.Tensor) -> float:
    """The softmax scale that gives the scores of q and k (first batch, first head) unit
    standard deviation: with ``1 / sqrt(headdim)`` the outlier channels alone would
    make every softmax one-hot, and the errors would measure ties between keys rather
    than quantisation."""
    s = q[0, :, 0].double() @ k[0, :, 0].double().T
    return 1.0 / max(s.std().item(), 1e-6)


def accuracy(batch: int, seqlen: int, nheads: int, head_dim: int, device: str) -> list[dict]:
    rows = []
    for kind in ("normal", "outliers"):
        q, k, v = make_inputs(kind, batch, seqlen, nheads, head_dim, device)
        scale = outlier_scale(q, k) if kind == "outliers" else 1 / math.sqrt(head_dim)
        for causal in (False, True):
            ref = attention_ref(q, k, v, softmax_scale=scale, causal=causal, compute_dtype=torch.float64)
            row = dict(inputs=kind, causal=causal, batch=batch, seqlen=seqlen, nheads=nheads, head_dim=head_dim,
                       softmax_scale=scale, ref_rms=ref.pow(2).mean().sqrt().item())
            kw = dict(softmax_scale=scale, causal=causal)
            with torch.no_grad():
                row["bf16"] = errors(flashtile.flash_attn_func(q, k, v, **kw), ref)
                for name, variant in VARIANTS.items():
                    row[name] = errors(flash_attn_fp8_func(q, k, v, out_dtype=torch.bfloat16, **kw, **variant), ref)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def speed(seqlens=(1024, 2048, 4096, 8192, 16384), head_dim: int = 128, hidden: int = 2048,
          tokens: int = 16384) -> dict:
    from triton.testing import do_bench

    def bench(fn):
        with torch.no_grad():
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    nheads = hidden // head_dim
    attention, quantize = [], []
    for seqlen in seqlens:
        batch = max(1, tokens // seqlen)
        q, k, v = make_inputs("normal", batch, seqlen, nheads, head_dim, "cuda")
        quantised = {s: quantize_qkv(q, k, v, scaling=s, incoherent=True) for s in ("block", "tensor")}
        for causal in (False, True):
            flops = 4 * batch * nheads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
            row = dict(seqlen=seqlen, batch=batch, nheads=nheads, head_dim=head_dim, causal=causal)
            row["bf16_ms"] = bench(lambda: flashtile.flash_attn_func(q, k, v, causal=causal))
            for s, (q8, k8, v8, qd, kd, vd) in quantised.items():
                row[f"fp8_{s}_ms"] = bench(lambda: flashtile.flash_attn_func(
                    q8, k8, v8, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=torch.bfloat16))
            for key in [key for key in row if key.endswith("_ms")]:
                row[key[:-3] + "_tflops"] = flops / row[key] / 1e9
            row["fp8_block_speedup"] = row["bf16_ms"] / row["fp8_block_ms"]
            attention.append(row)
            print(json.dumps(row), flush=True)
        moved = 3 * q.numel() * (2 + 1)  # bf16 read, fp8 written (descales are negligible)
        for scaling in ("block", "head", "tensor"):
            for incoherent in (False, True):
                ms = bench(lambda: quantize_qkv(q, k, v, scaling=scaling, incoherent=incoherent))
                row = dict(seqlen=seqlen, batch=batch, scaling=scaling, incoherent=incoherent, ms=ms,
                           gb_per_s=moved / ms / 1e6)
                quantize.append(row)
                print(json.dumps(row), flush=True)
    return dict(attention=attention, quantize=quantize)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fp8.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--speed", action="store_true", help="also time the FP8 forward and quantize_qkv (GPU)")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the accuracy part")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384", help="speed part's sequence lengths")
    args = ap.parse_args(argv)
    if args.speed and args.device != "cuda":
        ap.error("--speed needs a CUDA GPU")
    small = args.small or args.device != "cuda"
    batch = args.batch or (1 if small else 2)
    seqlen = args.seqlen or (96 if small else 4096)
    heads = args.heads or (2 if small else 16)
    head_dim = args.head_dim or (32 if small else 128)
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__)
    if not args.no_accuracy:
        result["accuracy"] = accuracy(batch, seqlen, heads, head_dim, args.device)
    if args.speed:
        result["speed"] = speed(tuple(int(s) for s in args.seqlens.split(",")))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
