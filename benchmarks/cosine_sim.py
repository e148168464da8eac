"""Cosine-similarity attention: the fused kernel against plain PyTorch, and against
flashtile's own softmax attention on the same normalised inputs.

    python benchmarks/cosine_sim.py [--causal] [--mask-prob P] [--only-forwards | --only-backwards] \\
        [--seqlens 128,256,...] [--dtypes float32,float16,bfloat16] [--out results/cosine_sim.json]

Providers, all on ``(batch, heads, seqlen, dim)`` inputs:

* ``kernel``: ``flash_cosine_sim_attention`` (l2norm of q and k included);
* ``baseline``: ``plain_cosine_sim_attention``, materialised, in the input dtype
  ("oom" where it does not fit);
* ``kernel_prenorm``: the fused kernel alone, on inputs normalised beforehand
  (``l2norm_qk=False``): fixed softmax offset, no running row max;
* ``softmax``: ``flashtile.scaled_dot_product_attention`` on the same normalised
  inputs: the ordinary running-max kernel (not run with both ``--causal`` and a mask).

``kernel_prenorm / softmax`` is what the missing row max buys. Times are
medians of warm runs (``triton.testing.do_bench``) on a GPU; on a CPU (tiled
PyTorch path) medians of a few runs with a plain timer, for smoke tests only.
The backward is timed alone (``--only-backwards``), from a retained graph.
"""

from __future__ import annotations

import argparse
import json

import torch

import flashtile
import flashtile.testing
from flashtile.cli.bench import median_ms


def measure(fn, inputs, backward: bool, cuda: bool):
    """Milliseconds of the forward of fn() or of its backward alone; "oom" if it does not fit."""
    try:
        if not backward:
            with torch.no_grad():
                return median_ms(fn, cuda)
        out = fn()
        dout = torch.randn_like(out)

        def step():
            for t in inputs:
                t.grad = None
            out.backward(dout, retain_graph=True)
        return median_ms(step, cuda)
    except torch.OutOfMemoryError:
        return "oom"
    finally:
        for t in inputs:
            t.grad = None
        if cuda:
            torch.cuda.empty_cache()


def run_one(seqlen: int, dtype: torch.dtype, args, device: str) -> dict:
    b, h, d = args.batch, args.heads, args.dim
    cuda = device == "cuda"
    q, k, v = (torch.randn(b, h, seqlen, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = None
    if args.mask_prob > 0:
        mask = torch.rand(b, seqlen, device=device) >= args.mask_prob
        mask[:, 0] = True
    qn, kn = (t.detach().requires_grad_() for t in flashtile.l2norm_tensors(q, k))
    scale, causal = args.scale, args.causal
    providers = {
        "kernel": (lambda: flashtile.flash_cosine_sim_attention(q, k, v, mask=mask, scale=scale, causal=causal),
                   (q, k, v)),
        "baseline": (lambda: flashtile.testing.plain_cosine_sim_attention(q, k, v, mask=mask, scale=scale,
                                                                          causal=causal), (q, k, v)),
        "kernel_prenorm": (lambda: flashtile.flash_cosine_sim_attention(qn, kn, v, mask=mask, scale=scale,
                                                                        causal=causal, l2norm_qk=False),
                           (qn, kn, v)),
    }
    if not (causal and mask is not None):
        attn_mask = None if mask is None else mask[:, None, None, :]
        providers["softmax"] = (lambda: flashtile.scaled_dot_product_attention(qn, kn, v, attn_mask=attn_mask,
                                                                               is_causal=causal, scale=scale),
                                (qn, kn, v))
    row = dict(seqlen=seqlen, dtype=str(dtype).removeprefix("torch."), batch=b, heads=h, dim=d, causal=causal,
               mask_prob=args.mask_prob, scale=scale)
    for mode in args.modes:
        for name, (fn, inputs) in providers.items():
            row[f"{mode}_{name}_ms"] = measure(fn, inputs, mode == "bwd", cuda)
    return row


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def _fmt(x) -> str:
    return f"{x:9.3f}" if isinstance(x, float) else f"{x or '-':>9}"


def print_table(rows, mode: str):
    cols = ["kernel", "baseline", "kernel_prenorm", "softmax"]
    print(f"{'seqlen':>7} " + " ".join(f"{c[:9]:>9}" for c in cols) + "  kernel/baseline  prenorm/softmax")
    for r in rows:
        t = [r.get(f"{mode}_{c}_ms") for c in cols]
        kb, ks = _ratio(t[0], t[1]), _ratio(t[2], t[3])
        print(f"{r['seqlen']:>7} " + " ".join(_fmt(x) for x in t)
              + f"  {(f'{kb:.2f}x' if kb else '-'):>15}  {(f'{ks:.2f}x' if ks else '-'):>15}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--mask-prob", type=float, default=0.0, help="probability that a key is padding")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only-forwards", action="store_true")
    group.add_argument("--only-backwards", action="store_true")
    parser.add_argument("--seqlens", default=",".join(str(128 << i) for i in range(9)), help="128 to 32768")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--scale", type=float, default=8.0)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.modes = ["fwd"] if args.only_forwards else ["bwd"] if args.only_backwards else ["fwd", "bwd"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (tiled PyTorch path; smoke test sizes only)"
    seqlens = [int(s) for s in args.seqlens.split(",")]
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        dtype_rows = []
        for seqlen in seqlens:
            torch.manual_seed(seqlen)
            dtype_rows.append(run_one(seqlen, dtype, args, device))
        rows += dtype_rows
        for mode in args.modes:
            print("-" * 100)
            print(f"{dtype_name} {'forward' if mode == 'fwd' else 'backward'}  batch {args.batch} heads {args.heads} "
                  f"dim {args.dim} scale {args.scale} causal {args.causal} mask_prob {args.mask_prob}  ms, {name}")
            print("-" * 100)
            print_table(dtype_rows, mode)
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
