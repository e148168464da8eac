"""What the options cost and save, on a GPU: variable-length packing against a
padded batch, sliding window against full attention, attention sinks against
the same call without them, a value head dim unlike q/k's against the dense
kernel, varlen over a paged cache against contiguous keys, batch-invariant mode against the
default launches, and the plain kernels with and without the option switches compiled in.

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


def sinks_cost(shapes=((64, 8, 64), (16, 16, 128)), seqlens=(1024, 4096, 16384), tokens=16384, rounds=2):
    """Attention sinks against the same call without them: (query heads, kv heads, head
    dim) shapes (gpt-oss's 64/8/64 first), batch = tokens / seqlen. Each variant is
    timed ``rounds`` times, alternating, and its best median kept (drift between the
    two measurements then does not show as cost)."""
    rows = []
    for nheads, nheads_k, head_dim in shapes:
        sinks = torch.randn(nheads, device="cuda", requires_grad=True)
        for seqlen in seqlens:
            batch = max(1, tokens // seqlen)
            q = torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(batch, seqlen, nheads_k, head_dim, device="cuda", dtype=torch.bfloat16,
                                requires_grad=True) for _ in range(2))
            for causal in (False, True):
                for backward in (False, True):
                    times = {"none": [], "sinks": []}
                    for _ in range(rounds):
                        for name, s in (("none", None), ("sinks", sinks)):
                            times[name].append(bench(lambda: flashtile.flash_attn_func(
                                q, k, v, causal=causal, sinks=s), backward))
                    row = dict(nheads=nheads, nheads_k=nheads_k, head_dim=head_dim, seqlen=seqlen, batch=batch,
                               causal=causal, mode="fwd_bwd" if backward else "fwd",
                               none_ms=min(times["none"]), sinks_ms=min(times["sinks"]))
                    row["cost"] = row["sinks_ms"] / row["none_ms"] - 1
                    rows.append(row)
                    print(row, flush=True)
    return rows


def value_head_dim(pairs=((192, 128), (192, 192), (128, 128), (64, 128), (128, 64)), seqlens=(4096, 16384),
                   tokens=32768, nheads=16):
    """A value head dim unlike q/k's (MLA's 192/128) against the dense kernel of the same
    q/k head dim: TFLOP/s counting ``2 * (d + dv)`` FLOPs per (query, key) pair forward
    (half of them causal) and 2.5 times that for the backward, as the benchmarks do."""
    rows = []
    for seqlen in seqlens:
        batch = max(1, tokens // seqlen)
        for d, dv in pairs:
            q, k = (torch.randn(batch, seqlen, nheads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            v = torch.randn(batch, seqlen, nheads, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for causal in (False, True):
                for backward in (False, True):
                    ms = bench(lambda: flashtile.flash_attn_func(q, k, v, causal=causal), backward)
                    flops = 2 * batch * nheads * seqlen * seqlen * (d + dv) * (0.5 if causal else 1.0)
                    flops *= 3.5 if backward else 1.0
                    row = dict(d=d, dv=dv, seqlen=seqlen, batch=batch, causal=causal,
                               mode="fwd_bwd" if backward else "fwd", ms=ms, tflops=flops / ms / 1e9)
                    rows.append(row)
                    print(row, flush=True)
    return rows


def paged_varlen(page_sizes=(16, 64, 256), batch=8, new_tokens=(512, 2048), cached=4096, nheads=32, nheads_k=8,
                 head_dim=128):
    """Chunked prefill: ``new`` query tokens per sequence against ``cached + new`` keys
    (causal, bottom-right), flash_attn_varlen_func over a paged cache (pages shuffled)
    against the same call on contiguous packed keys. Forward, bf16."""
    rows = []
    dev, dt = "cuda", torch.bfloat16
    for new in new_tokens:
        n_k = cached + new
        cu_q = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=dev)
        cu_k = torch.arange(0, (batch + 1) * n_k, n_k, dtype=torch.int32, device=dev)
        q = torch.randn(batch * new, nheads, head_dim, device=dev, dtype=dt)
        k, v = (torch.randn(batch * n_k, nheads_k, head_dim, device=dev, dtype=dt) for _ in range(2))
        row = dict(new_tokens=new, keys=n_k, batch=batch)
        with torch.no_grad():
            row["contiguous_ms"] = bench(lambda: flashtile.flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, new, n_k, causal=True), False)
            for page in page_sizes:
                pages = -(-n_k // page)
                order = torch.randperm(batch * pages, device=dev)
                table = order.reshape(batch, pages).to(torch.int32)
                k_cache = torch.zeros(batch * pages, page, nheads_k, head_dim, device=dev, dtype=dt)
                v_cache = torch.zeros_like(k_cache)
                padded = torch.zeros(batch, pages * page, nheads_k, head_dim, device=dev, dtype=dt)
                padded[:, :n_k] = k.view(batch, n_k, nheads_k, head_dim)
                k_cache[table.flatten().long()] = padded.view(batch * pages, page, nheads_k, head_dim)
                padded[:, :n_k] = v.view(batch, n_k, nheads_k, head_dim)
                v_cache[table.flatten().long()] = padded.view(batch * pages, page, nheads_k, head_dim)
                out = flashtile.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, new, n_k, causal=True,
                                                       block_table=table)
                ref = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, new, n_k, causal=True)
                row[f"paged{page}_max_diff"] = (out.float() - ref.float()).abs().max().item()
                row[f"paged{page}_ms"] = bench(lambda: flashtile.flash_attn_varlen_func(
                    q, k_cache, v_cache, cu_q, cu_k, new, n_k, causal=True, block_table=table), False)
                row[f"paged{page}_ratio"] = row[f"paged{page}_ms"] / row["contiguous_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


def batch_invariant_cost(head_dims=(64, 128), seqlens=(2048, 8192, 16384), tokens=16384,
                         decode_shapes=((1, 32768), (16, 8192), (64, 4096)), rounds=2):
    """Batch-invariant mode (``flashtile.set_batch_invariant``) against the default launches:
    the forward (bf16, hidden 2048, causal and not) and one decoding step (32 query / 8 kv
    heads of 128, bf16, batch x cache length). Each variant is timed ``rounds`` times,
    alternating, its best median kept."""
    rows = []

    def timed(fn):
        times = {False: [], True: []}
        for _ in range(rounds):
            for mode in (False, True):
                flashtile.set_batch_invariant(mode)
                times[mode].append(bench(fn, False))
        flashtile.set_batch_invariant(False)
        return min(times[False]), min(times[True])

    for head_dim in head_dims:
        nheads = 2048 // head_dim
        for seqlen in seqlens:
            batch = max(1, tokens // seqlen)
            q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            for causal in (False, True):
                default, invariant = timed(lambda: flashtile.flash_attn_func(q, k, v, causal=causal))
                row = dict(kind="forward", head_dim=head_dim, seqlen=seqlen, batch=batch, causal=causal,
                           default_ms=default, invariant_ms=invariant, cost=invariant / default - 1)
                rows.append(row)
                print(row, flush=True)
    for batch, cache in decode_shapes:
        q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(batch, cache, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((batch,), cache - 1, dtype=torch.int32, device="cuda")
        default, invariant = timed(lambda: flashtile.flash_attn_with_kvcache(q, k_cache, v_cache,
                                                                             cache_seqlens=lengths))
        row = dict(kind="decode", batch=batch, cache=cache, default_ms=default, invariant_ms=invariant,
                   cost=invariant / default - 1)
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="features.json")
    ap.add_argument("--parts", default="varlen,window,sinks,head_dim_v,paged,batch_invariant",
                    help="comma list of varlen, window, sinks, head_dim_v, paged, batch_invariant")
    args = ap.parse_args()
    parts = args.parts.split(",")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    if "varlen" in parts:
        result["varlen"] = varlen_vs_padded()
    if "window" in parts:
        result["window"] = window_vs_full()
    if "sinks" in parts:
        result["sinks"] = sinks_cost()
    if "head_dim_v" in parts:
        result["head_dim_v"] = value_head_dim()
    if "paged" in parts:
        result["paged_varlen"] = paged_varlen()
    if "batch_invariant" in parts:
        result["batch_invariant"] = batch_invariant_cost()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
