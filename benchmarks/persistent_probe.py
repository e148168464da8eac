"""Probe: does a persistent forward pay at 1k-4k keys?

At 1k keys a forward program runs only 8-16 key tiles, and its start (the Q
tile's load, the first K/V tiles) and end (the O tile's store) overlap no
matmul of its own. A persistent grid (one program a multiprocessor, looping
over the (batch, head, query block) work items) lets Triton's pipeliner, with
the item loop and the key loop flattened into one (``tl.range(...,
flatten=True)``), load the next item's first tiles while the current one ends.

One stripped kernel (non-causal, tensor descriptors over the whole (batch *
seqlen, heads * head dim) matrix, seqlen a multiple of the tiles, optionally
the query block as two halves) on three grids, timed in the same run:
- ``tiles``: one program per work item (the loop runs once), as flashtile does;
- ``persistent``: one program per multiprocessor, the item loop not pipelined;
- ``flatten``: the same, the two loops flattened;
- ``persistent2``, ``flatten2``: two programs a multiprocessor.

    python benchmarks/persistent_probe.py --head-dims 64,128,256 --seqlens 1024,2048,4096
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from flashtile.api import launch
from overlap_probe import _softmax_pv, probe_inputs  # (benchmarks/ is the script's folder)


@triton.jit
def _load_rows(X, row, col, width, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    # a pointer load: a descriptor load of Q under the flattened loop's condition does not compile (Triton 3.6)
    rows = row + tl.arange(0, ROWS)
    return tl.load(X + rows.to(tl.int64)[:, None] * width + col + tl.arange(0, HEAD_DIM)[None, :])


@triton.jit
def _store_rows(X, row, col, width, x, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = row + tl.arange(0, ROWS)
    tl.store(X + rows.to(tl.int64)[:, None] * width + col + tl.arange(0, HEAD_DIM)[None, :], x)


@triton.jit
def probe_fwd_persistent(Q, K, V, Out, total_rows, seqlen, nheads, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HALVES: tl.constexpr, FLATTEN: tl.constexpr):
    HALF: tl.constexpr = BLOCK_M // 2 if HALVES else BLOCK_M
    width = nheads * HEAD_DIM
    k_desc = tl.make_tensor_descriptor(K, [total_rows, width], [width, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, [total_rows, width], [width, 1], [BLOCK_N, HEAD_DIM])
    n_m = seqlen // BLOCK_M
    n_items = n_m * (total_rows // seqlen) * nheads
    # items with the query block fastest: programs running together share a head's K/V in L2
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), flatten=FLATTEN):
        bh = item // n_m
        row0 = (bh // nheads) * seqlen
        col = (bh % nheads) * HEAD_DIM
        q_row = row0 + (item % n_m) * BLOCK_M
        q_a = _load_rows(Q, q_row, col, width, HALF, HEAD_DIM)
        m_a = tl.full([HALF], float("-inf"), dtype=tl.float32)
        l_a = tl.zeros([HALF], dtype=tl.float32)
        acc_a = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
        if HALVES:
            q_b = _load_rows(Q, q_row + HALF, col, width, HALF, HEAD_DIM)
            m_b = tl.full([HALF], float("-inf"), dtype=tl.float32)
            l_b = tl.zeros([HALF], dtype=tl.float32)
            acc_b = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
        for start in tl.range(0, seqlen, BLOCK_N):
            k = k_desc.load([row0 + start, col])
            v = v_desc.load([row0 + start, col])
            s_a = tl.dot(q_a, tl.trans(k))
            if HALVES:
                s_b = tl.dot(q_b, tl.trans(k))
            acc_a, l_a, m_a = _softmax_pv(s_a, acc_a, l_a, m_a, v, qk_scale)
            if HALVES:
                acc_b, l_b, m_b = _softmax_pv(s_b, acc_b, l_b, m_b, v, qk_scale)
        _store_rows(Out, q_row, col, width, (acc_a / l_a[:, None]).to(Out.dtype.element_ty), HALF, HEAD_DIM)
        if HALVES:
            _store_rows(Out, q_row + HALF, col, width, (acc_b / l_b[:, None]).to(Out.dtype.element_ty), HALF,
                        HEAD_DIM)


def probe(q, k, v, block_m, block_n, warps, stages, halves, grid_kind):
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    triton.set_allocator(launch._scratch_allocator)  # device-side descriptors need scratch memory
    n_items = s // block_m * b * h
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    per_sm = 2 if grid_kind.endswith("2") else 1  # "persistent2", "flatten2": two programs a multiprocessor
    grid = (n_items if grid_kind == "tiles" else min(n_items, per_sm * sms),)
    probe_fwd_persistent[grid](q, k, v, out, b * s, s, h, d**-0.5 * 1.4426950408889634, HEAD_DIM=d,
                               BLOCK_M=block_m, BLOCK_N=block_n, HALVES=halves, FLATTEN=grid_kind.startswith("flatten"),
                               num_warps=warps, num_stages=stages)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,2048,4096")
    # BLOCK_M x BLOCK_N x warps x stages, "h" at the end: two halves of the query block
    ap.add_argument("--configs", default="d64:128x128x4x3h,d128:256x64x8x3h,d128:256x64x8x2h,d256:128x64x8x2,"
                                         "d256:128x64x8x1")
    ap.add_argument("--kinds", default="tiles,persistent,flatten,persistent2,flatten2")
    args = ap.parse_args()
    configs = {}
    for c in args.configs.split(","):
        dim, tile = c.split(":")
        configs.setdefault(int(dim[1:]), []).append(tile)
    import flashtile

    for d in map(int, args.head_dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            q, k, v, ref, flops = probe_inputs(d, s)
            ms = do_bench(lambda: flashtile.flash_attn_func(q, k, v), warmup=10, rep=50, return_mode="median")
            print(f"d{d} s{s} flashtile {flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
            for tile in configs.get(d, []):
                halves = tile.endswith("h")
                cfg = tuple(map(int, tile.rstrip("h").split("x")))
                line = []
                # two rounds, alternating, so that clock drift falls on every grid alike
                best = {}
                for _ in range(2):
                    for kind in args.kinds.split(","):
                        try:
                            out = probe(q, k, v, *cfg, halves, kind)
                            err = (out.float() - ref.float()).abs().max().item()
                            ms = do_bench(lambda: probe(q, k, v, *cfg, halves, kind), warmup=10, rep=50,
                                          return_mode="median")
                            tf = flops / ms * 1e-9
                            best[kind] = max(best.get(kind, (0, err))[0], tf), err
                        except Exception as exc:  # a grid that does not compile is reported, not fatal
                            best[kind] = (0.0, type(exc).__name__)
                for kind, (tf, err) in best.items():
                    line.append(f"{kind} {tf:.0f} (err {err:.1e})" if tf else f"{kind} {err}")
                print(f"d{d} s{s} {tile}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
