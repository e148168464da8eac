"""Context parallelism across processes: forward+backward of ring (or Ulysses)
attention over one long sequence on W ranks, against one rank over the whole
sequence and against the ideal (the one-rank time divided by W).

    python benchmarks/ring_scaling.py --out results/ring_scaling.json      # GPUs: NCCL, one process a GPU
    python benchmarks/ring_scaling.py --small --out /tmp/ring_scaling.json # CPU: gloo, toy sizes

Defaults are a Llama-3-8B attention layer (32 query heads, 8 kv heads, head
dim 128, bf16, causal, zigzag) at 128k, 512k and 1M tokens on 1, 2, 4 and 8
GPUs. Each world size is its own set of processes (this script started again
with ``--rank``), joined by a process group over TCP on this host.

A rank's time is the wall time from a barrier to its own backward's end (the
device synchronised); a run's time is the slowest rank's, the median over
``--reps`` runs after one warm-up. Where one rank does not hold the whole
sequence (out of memory, or longer than ``--one-rank-max-tokens``), the
one-rank time is extrapolated from the longest sequence it held as
attention's cost grows, with the square of the length (marked
``"extrapolated"``). Efficiency = one-rank time / (W x W-rank time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{name}: positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2,4,8", type=lambda s: _parse_ints(s, "--worlds"),
                    help="numbers of ranks (default 1,2,4,8; capped by the GPUs present)")
    ap.add_argument("--tokens", default="131072,524288,1048576", type=lambda s: _parse_ints(s, "--tokens"),
                    help="total sequence lengths")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", type=int, choices=[0, 1], default=1)
    ap.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    ap.add_argument("--method", choices=["ring", "ulysses"], default="ring")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per cell (after one warm-up)")
    ap.add_argument("--one-rank-max-tokens", type=int, default=524288,
                    help="longest sequence timed on one rank (longer ones extrapolated: a 1M-token causal "
                         "forward+backward takes over a minute on one H100)")
    ap.add_argument("--small", action="store_true",
                    help="CPU-sized run: gloo, 1 and 2 ranks, 256 tokens, 4 heads (2 kv) of 16, fp32")
    ap.add_argument("--out", default=None, help="JSON file of the results")
    # set by the launcher for the ranks it starts
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap


def _settings(args) -> dict:
    if args.small:
        return dict(worlds=[w for w in args.worlds if w <= 2] or [1, 2], tokens=[256], heads=4, kv_heads=2,
                    head_dim=16, backend="gloo", dtype="float32")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("ring_scaling: no GPU here; use --small for the CPU-sized run")
    return dict(worlds=[w for w in args.worlds if w <= gpus], tokens=args.tokens, heads=args.heads,
                kv_heads=args.kv_heads, head_dim=args.head_dim, backend="nccl", dtype="bfloat16")


def _rank_main(args) -> None:
    """One rank: time forward+backward of its shard at each length; rank 0 writes the times."""
    import torch.distributed as dist

    from flashtile import flash_attn_func
    from flashtile.distributed import ring_flash_attn_func, ulysses_flash_attn_func

    cfg = _settings(args)
    rank, world = args.rank, args.world
    if cfg["backend"] == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)  # the ranks share the machine's cores
        device = torch.device("cpu")
    # a rank left waiting for a peer that failed gives up instead of hanging
    timeout = datetime.timedelta(minutes=10)
    store = dist.TCPStore("127.0.0.1", args.port, world, rank == 0, timeout=timeout)  # hosted by rank 0
    dist.init_process_group(cfg["backend"], store=store, rank=rank, world_size=world, timeout=timeout)
    dtype = getattr(torch, cfg["dtype"])
    attend = ring_flash_attn_func if args.method == "ring" else ulysses_flash_attn_func

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for tokens in cfg["tokens"]:
        local = tokens // world
        if world == 1 and tokens > args.one_rank_max_tokens:
            rows.append(dict(tokens=tokens, local_tokens=local, ms=None))
            continue
        torch.manual_seed(rank)  # random shards: the time does not depend on the values
        try:
            q, k, v = (torch.randn(1, local, h, cfg["head_dim"], device=device, dtype=dtype).requires_grad_()
                       for h in (cfg["heads"], cfg["kv_heads"], cfg["kv_heads"]))
            dout = torch.randn_like(q)

            def step():
                if world == 1:
                    out = flash_attn_func(q, k, v, causal=bool(args.causal))
                else:
                    out = attend(q, k, v, causal=bool(args.causal), layout=args.layout)
                out.backward(dout)

            times = []
            for rep in range(args.reps + 1):
                q.grad = k.grad = v.grad = None
                dist.barrier()
                sync()
                start = time.perf_counter()
                step()
                sync()
                took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if rep:  # the first run warms up (compilation, allocator)
                    times.append(took.item() * 1e3)
            ok = torch.tensor([1])
        except torch.OutOfMemoryError:
            times, ok = [], torch.tensor([0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        rows.append(dict(tokens=tokens, local_tokens=local,
                         ms=statistics.median(times) if ok.item() else None))
        q = k = v = dout = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"world": world, "rows": rows}, f)
    dist.barrier()  # no rank leaves while a peer's transfers may still be in flight
    dist.destroy_process_group()
    # rank 0 hosts the store: it leaves last, so that no rank loses the store while tearing down
    # (a rank that did aborted now and then on a loaded machine)
    if rank:
        store.set(f"done{rank}", "1")
    else:
        store.wait([f"done{r}" for r in range(1, world)])


def _rank_argv(args) -> list[str]:
    """The arguments a rank is started with: the run's settings (not its output file)."""
    argv = ["--worlds", ",".join(map(str, args.worlds)), "--tokens", ",".join(map(str, args.tokens)),
            "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
            "--causal", str(args.causal), "--layout", args.layout, "--method", args.method, "--reps", str(args.reps),
            "--one-rank-max-tokens", str(args.one_rank_max_tokens)]
    return argv + (["--small"] if args.small else [])


def _launch(args, world: int, result: str) -> dict:
    """Start ``world`` ranks of this script, wait for them, and return rank 0's times."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *_rank_argv(args), "--rank", str(r), "--world",
                               str(world), "--port", str(port), "--result", result], env=env)
             for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"ring_scaling: a rank of world size {world} failed (exit codes {codes})")
    with open(result) as f:
        return json.load(f)


def _one_rank_ms(one: dict, tokens: int) -> tuple[float | None, bool]:
    """The one-rank time at ``tokens``: measured, or extrapolated (quadratic) from the longest it held."""
    if one.get(tokens) is not None:
        return one[tokens], False
    held = [n for n, ms in one.items() if ms is not None]
    if not held:
        return None, False
    base = max(held)
    return one[base] * (tokens / base) ** 2, True


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.rank is not None:
        _rank_main(args)
        return 0
    cfg = _settings(args)
    zig = 2 if args.layout == "zigzag" else 1
    for tokens in cfg["tokens"]:
        for world in cfg["worlds"]:
            if tokens % (zig * world):
                raise SystemExit(f"ring_scaling: --tokens {tokens} does not split into {zig * world} equal chunks")
    if args.method == "ulysses" and any(cfg["heads"] % w for w in cfg["worlds"]):
        raise SystemExit("ring_scaling: Ulysses needs --heads divisible by every world size")
    worlds = sorted(set(cfg["worlds"]) | {1})
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            measured[world] = {row["tokens"]: row["ms"] for row in
                               _launch(args, world, os.path.join(tmp, f"w{world}.json"))["rows"]}
    rows = []
    for tokens in cfg["tokens"]:
        # FLOPs of forward+backward as FlashAttention counts them (3.5x the forward's)
        flops = 3.5 * 4 * tokens * tokens * cfg["heads"] * cfg["head_dim"] / (2 if args.causal else 1)
        one_ms, extrapolated = _one_rank_ms(measured[1], tokens)
        for world in worlds:
            ms = measured[world][tokens]
            eff = one_ms / (world * ms) if one_ms is not None and ms is not None else None
            rows.append(dict(tokens=tokens, world=world, ms=ms, one_rank_ms=one_ms,
                             one_rank_extrapolated=extrapolated, ideal_ms=None if one_ms is None else one_ms / world,
                             efficiency=eff,
                             tflops_per_rank=None if ms is None else flops / (world * ms * 1e9)))
            print(f"{tokens:8d} tokens, {world} rank(s): "
                  + (f"{ms:10.1f} ms, {rows[-1]['tflops_per_rank']:6.1f} TFLOP/s a rank" if ms is not None
                     else "  out of memory")
                  + (f", {eff * 100:5.1f}% of ideal" if eff is not None else "")
                  + (" (one-rank time extrapolated)" if extrapolated else ""), flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if cfg["backend"] == "nccl" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "backend": cfg["backend"], "method": args.method, "layout": args.layout,
                       "causal": bool(args.causal), "heads": cfg["heads"], "kv_heads": cfg["kv_heads"],
                       "head_dim": cfg["head_dim"], "dtype": cfg["dtype"], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
