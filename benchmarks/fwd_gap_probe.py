"""Probe: what separates the forward kernel from a stripped one at 1k keys?

The stripped forward of ``persistent_probe.py`` (full attention, the query
block as two halves, K/V tensor descriptors over the whole tensor, no bounds,
no LSE) ran d64 at 1k keys 9% faster than flashtile's forward kernel with
the same tiles (416 against 381 TFLOP/s, H200). This kernel adds what the real one does, one switch at a
time, each variant timed in the same run as flashtile:
- ``BH_DESC``: K/V descriptors of this program's (batch, head), as the
  kernel builds them, instead of one over the whole tensor;
- ``MASKED_IO``: the Q rows loaded and the O rows stored under the row bound;
  the LSE written; rows that saw no key give 0;
- ``TAIL_LOOP``: a second, masked key loop after the full tiles (the
  kernel's partial last tile; empty when seqlen is a multiple of the tile).

    python benchmarks/fwd_gap_probe.py --head-dims 64,128 --seqlens 1024,4096
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from flashtile.api import launch
from overlap_probe import _softmax_pv, init_halves, probe_inputs  # (benchmarks/ is the script's folder)


@triton.jit
def _keys(acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_desc, v_desc, row0, col, start, end, seqlen, qk_scale,
          BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    for start_n in tl.range(start, end, BLOCK_N):
        k = k_desc.load([row0 + start_n, col])
        v = v_desc.load([row0 + start_n, col])
        cols = start_n + tl.arange(0, BLOCK_N)
        s_a = tl.dot(q_a, tl.trans(k))
        s_b = tl.dot(q_b, tl.trans(k))
        if MASKED:  # keys past the end (every row has seen the full tiles before: no row stays at -inf)
            s_a = tl.where(cols[None, :] < seqlen, s_a, float("-inf"))
            s_b = tl.where(cols[None, :] < seqlen, s_b, float("-inf"))
        acc_a, l_a, m_a = _softmax_pv(s_a, acc_a, l_a, m_a, v, qk_scale)
        acc_b, l_b, m_b = _softmax_pv(s_b, acc_b, l_b, m_b, v, qk_scale)
    return acc_a, l_a, m_a, acc_b, l_b, m_b


@triton.jit
def _rows_in(X, row, col, width, seqlen, local, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, ROWS)
    ptrs = X + (row + rows).to(tl.int64)[:, None] * width + col + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(local + rows < seqlen)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _rows_out(X, Lse, row, col, width, seqlen, local, acc, l_i, m_i, lse_row, ROWS: tl.constexpr,
              HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, ROWS)
    ptrs = X + (row + rows).to(tl.int64)[:, None] * width + col + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        seen = l_i > 0.0
        acc = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i * 0.6931471805599453 + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        ok = local + rows < seqlen
        tl.store(ptrs, acc.to(X.dtype.element_ty), mask=ok[:, None])
        tl.store(Lse + lse_row + local + rows, lse, mask=ok)
    else:
        tl.store(ptrs, (acc / l_i[:, None]).to(X.dtype.element_ty))


@triton.jit
def probe_fwd_gap(Q, K, V, Out, Lse, total_rows, seqlen, nheads, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BH_DESC: tl.constexpr, MASKED_IO: tl.constexpr, TAIL_LOOP: tl.constexpr):
    HALF: tl.constexpr = BLOCK_M // 2
    width = nheads * HEAD_DIM
    n_m = tl.cdiv(seqlen, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh = tl.program_id(0) // n_m
    b = bh // nheads
    h = bh % nheads
    if BH_DESC:
        base = b.to(tl.int64) * seqlen * width + h * HEAD_DIM
        k_desc = tl.make_tensor_descriptor(K + base, [seqlen, HEAD_DIM], [width, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V + base, [seqlen, HEAD_DIM], [width, 1], [BLOCK_N, HEAD_DIM])
        kv_row0 = 0
        kv_col = 0
    else:
        k_desc = tl.make_tensor_descriptor(K, [total_rows, width], [width, 1], [BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(V, [total_rows, width], [width, 1], [BLOCK_N, HEAD_DIM])
        kv_row0 = b * seqlen
        kv_col = h * HEAD_DIM
    row = b * seqlen + pid_m * BLOCK_M
    local = pid_m * BLOCK_M
    col = h * HEAD_DIM
    q_a = _rows_in(Q, row, col, width, seqlen, local, HALF, HEAD_DIM, MASKED_IO)
    q_b = _rows_in(Q, row + HALF, col, width, seqlen, local + HALF, HALF, HEAD_DIM, MASKED_IO)
    acc_a, l_a, m_a, acc_b, l_b, m_b = init_halves(HALF, HEAD_DIM)
    full_end = seqlen // BLOCK_N * BLOCK_N if TAIL_LOOP else seqlen
    acc_a, l_a, m_a, acc_b, l_b, m_b = _keys(acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_desc, v_desc, kv_row0,
                                             kv_col, 0, full_end, seqlen, qk_scale, BLOCK_N, False)
    if TAIL_LOOP:
        acc_a, l_a, m_a, acc_b, l_b, m_b = _keys(acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_desc, v_desc,
                                                 kv_row0, kv_col, full_end, seqlen, seqlen, qk_scale, BLOCK_N, True)
    lse_row = bh * seqlen
    _rows_out(Out, Lse, row, col, width, seqlen, local, acc_a, l_a, m_a, lse_row, HALF, HEAD_DIM, MASKED_IO)
    _rows_out(Out, Lse, row + HALF, col, width, seqlen, local + HALF, acc_b, l_b, m_b, lse_row, HALF, HEAD_DIM,
              MASKED_IO)


VARIANTS = {  # cumulative: each adds one thing the kernel does
    "stripped": dict(BH_DESC=False, MASKED_IO=False, TAIL_LOOP=False),
    "+bh_desc": dict(BH_DESC=True, MASKED_IO=False, TAIL_LOOP=False),
    "+masked_io_lse": dict(BH_DESC=True, MASKED_IO=True, TAIL_LOOP=False),
    "+tail_loop": dict(BH_DESC=True, MASKED_IO=True, TAIL_LOOP=True),
}


def probe(q, k, v, out, lse, cfg, switches):
    b, s, h, d = q.shape
    block_m, block_n, warps, stages = cfg
    triton.set_allocator(launch._scratch_allocator)  # device-side descriptors need scratch memory
    grid = (triton.cdiv(s, block_m) * b * h,)
    probe_fwd_gap[grid](q, k, v, out, lse, b * s, s, h, d**-0.5 * 1.4426950408889634, HEAD_DIM=d, BLOCK_M=block_m,
                        BLOCK_N=block_n, num_warps=warps, num_stages=stages, **switches)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import flashtile

    tiles = {64: (128, 128, 4, 3), 128: (256, 64, 8, 3)}  # the table's two-halves tiles
    for d in map(int, args.head_dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            q, k, v, ref, flops = probe_inputs(d, s)
            out, lse = torch.empty_like(q), torch.empty(q.shape[0] * q.shape[2] * s, device="cuda")
            runs = dict(flashtile=lambda: flashtile.flash_attn_func(q, k, v))
            runs.update({name: (lambda sw=sw: probe(q, k, v, out, lse, tiles[d], sw)) for name, sw in VARIANTS.items()})
            best, errors = {}, {}
            for _ in range(args.rounds):  # alternating, so that clock drift falls on every variant alike
                for name, fn in runs.items():
                    fn()
                    if name != "flashtile":
                        errors[name] = (out.float() - ref.float()).abs().max().item()
                    ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    best[name] = max(best.get(name, 0.0), flops / ms * 1e-9)
            line = "  ".join(f"{name} {tf:.0f}" + (f" (err {errors[name]:.1e})" if name in errors else "")
                             for name, tf in best.items())
            print(f"d{d} s{s} {tiles[d]}: {line}", flush=True)


if __name__ == "__main__":
    main()
