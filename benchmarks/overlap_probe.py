"""Probe: does computing the next tile's scores before this tile's softmax pay?

A stripped forward (non-causal, tensor descriptors, seqlen a multiple of the
tiles) in two schedules:
- in order: S_j = Q K_j^T; softmax(S_j); O += P_j V_j
- scores one tile ahead: S_{j+1} = Q K_{j+1}^T is issued before the softmax
  of S_j, so the tensor cores can run it while the softmax of tile j runs
  (FlashAttention-3's intra-warpgroup overlap), at the cost of holding two
  score tiles in registers.
- two halves (``--halves``): the query block as two halves a, b sharing each K/V
  tile: S_a, S_b; softmax(S_a); O_a += P_a V; softmax(S_b); O_b += P_b V. The
  product P_a V is an accumulation, which Triton keeps in flight, so it can
  run on the tensor cores during the softmax of half b.

    python benchmarks/overlap_probe.py --head-dims 64,128 --seqlens 1024,4096
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from flashtile.api import launch


@triton.jit
def _softmax_pv(s, acc, l_i, m_i, v, qk_scale):
    s = s * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def init_halves(HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(acc, l, m) of two halves of HALF query rows before any key."""
    m = tl.full([HALF], float("-inf"), dtype=tl.float32)
    zero_l = tl.zeros([HALF], dtype=tl.float32)
    zero_acc = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    return zero_acc, zero_l, m, zero_acc, zero_l, m


@triton.jit
def _descriptors(Q, K, V, Out, seqlen, stride_s, nheads, HEAD_DIM: tl.constexpr, Q_ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Tensor descriptors of this program's (batch, head): Q and Out in tiles of
    Q_ROWS rows, K and V in tiles of BLOCK_N."""
    bh = tl.program_id(1)
    off = (bh // nheads).to(tl.int64) * seqlen * stride_s + (bh % nheads) * HEAD_DIM
    q_desc = tl.make_tensor_descriptor(Q + off, [seqlen, HEAD_DIM], [stride_s, 1], [Q_ROWS, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + off, [seqlen, HEAD_DIM], [stride_s, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + off, [seqlen, HEAD_DIM], [stride_s, 1], [BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(Out + off, [seqlen, HEAD_DIM], [stride_s, 1], [Q_ROWS, HEAD_DIM])
    return q_desc, k_desc, v_desc, o_desc


@triton.jit
def probe_fwd_halves(Q, K, V, Out, seqlen, stride_s, nheads, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = BLOCK_M // 2
    pid_m = tl.program_id(0)
    q_desc, k_desc, v_desc, o_desc = _descriptors(Q, K, V, Out, seqlen, stride_s, nheads, HEAD_DIM, HALF, BLOCK_N)
    q_a = q_desc.load([pid_m * BLOCK_M, 0])
    q_b = q_desc.load([pid_m * BLOCK_M + HALF, 0])
    acc_a, l_a, m_a, acc_b, l_b, m_b = init_halves(HALF, HEAD_DIM)
    for start in tl.range(0, seqlen, BLOCK_N):
        k = k_desc.load([start, 0])
        v = v_desc.load([start, 0])
        s_a = tl.dot(q_a, tl.trans(k))
        s_b = tl.dot(q_b, tl.trans(k))
        acc_a, l_a, m_a = _softmax_pv(s_a, acc_a, l_a, m_a, v, qk_scale)
        acc_b, l_b, m_b = _softmax_pv(s_b, acc_b, l_b, m_b, v, qk_scale)
    o_desc.store([pid_m * BLOCK_M, 0], (acc_a / l_a[:, None]).to(Out.dtype.element_ty))
    o_desc.store([pid_m * BLOCK_M + HALF, 0], (acc_b / l_b[:, None]).to(Out.dtype.element_ty))


@triton.jit
def probe_fwd(Q, K, V, Out, seqlen, stride_s, nheads, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr):
    pid_m = tl.program_id(0)
    q_desc, k_desc, v_desc, o_desc = _descriptors(Q, K, V, Out, seqlen, stride_s, nheads, HEAD_DIM, BLOCK_M, BLOCK_N)
    q = q_desc.load([pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if AHEAD:
        s = tl.dot(q, tl.trans(k_desc.load([0, 0])))
        for start in tl.range(BLOCK_N, seqlen, BLOCK_N):
            s_next = tl.dot(q, tl.trans(k_desc.load([start, 0])))
            acc, l_i, m_i = _softmax_pv(s, acc, l_i, m_i, v_desc.load([start - BLOCK_N, 0]), qk_scale)
            s = s_next
        acc, l_i, m_i = _softmax_pv(s, acc, l_i, m_i, v_desc.load([seqlen - BLOCK_N, 0]), qk_scale)
    else:
        for start in tl.range(0, seqlen, BLOCK_N):
            s = tl.dot(q, tl.trans(k_desc.load([start, 0])))
            acc, l_i, m_i = _softmax_pv(s, acc, l_i, m_i, v_desc.load([start, 0]), qk_scale)
    acc = acc / l_i[:, None]
    o_desc.store([pid_m * BLOCK_M, 0], acc.to(Out.dtype.element_ty))


def probe_inputs(d, s):
    """The probes' case: bf16 (batch, s, heads, d) q, k, v of 16k tokens and hidden size 2048,
    SDPA's output for them, and the FLOPs of full attention."""
    b, h = max(1, 16384 // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    return q, k, v, ref.transpose(1, 2), 4 * b * h * s * s * d


def probe(q, k, v, block_m, block_n, warps, stages, maxnreg, ahead):
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    triton.set_allocator(launch._scratch_allocator)  # device-side descriptors need scratch memory
    grid = (s // block_m, b * h)
    if ahead == "halves":
        probe_fwd_halves[grid](q, k, v, out, s, q.stride(1), h, d**-0.5 * 1.4426950408889634, HEAD_DIM=d,
                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
                               maxnreg=maxnreg or None)
        return out
    probe_fwd[grid](q, k, v, out, s, q.stride(1), h, d**-0.5 * 1.4426950408889634, HEAD_DIM=d, BLOCK_M=block_m,
                    BLOCK_N=block_n, AHEAD=ahead, num_warps=warps, num_stages=stages,
                    maxnreg=maxnreg or None)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--configs", default="128x128x8x3,128x64x8x3,128x64x8x2r128,64x64x4x3,64x64x4x2")
    ap.add_argument("--ahead", action="store_true", help="also the scores-one-tile-ahead schedule")
    ap.add_argument("--halves", action="store_true", help="also the two-halves schedule")
    ap.add_argument("--no-order", action="store_true", help="skip the in-order schedule")
    args = ap.parse_args()
    # BLOCK_M x BLOCK_N x warps x stages, optionally "r" and a register cap (two programs per SM)
    configs = [tuple(map(int, c.replace("r", "x").split("x"))) for c in args.configs.split(",")]
    configs = [c if len(c) == 5 else c + (0,) for c in configs]
    for d in map(int, args.head_dims.split(",")):
        for s in map(int, args.seqlens.split(",")):
            q, k, v, ref, flops = probe_inputs(d, s)
            import flashtile

            ms = do_bench(lambda: flashtile.flash_attn_func(q, k, v), warmup=10, rep=50, return_mode="median")
            print(f"d{d} s{s} flashtile {flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
            for cfg in configs:
                line = []
                for ahead in (False, True, "halves"):
                    if (ahead is True and not args.ahead) or (ahead == "halves" and not args.halves) or (
                            ahead is False and args.no_order):
                        continue
                    try:
                        out = probe(q, k, v, *cfg, ahead)
                        err = (out.float() - ref.float()).abs().max().item()
                        ms = do_bench(lambda: probe(q, k, v, *cfg, ahead), warmup=10, rep=50, return_mode="median")
                        name = ahead if isinstance(ahead, str) else "ahead" if ahead else "order"
                        line.append(f"{name} {flops / ms * 1e-9:.0f} (err {err:.1e})")
                    except Exception as exc:
                        line.append(f"{ahead} {type(exc).__name__}")
                print(f"d{d} s{s} {cfg}: " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
