"""The benchmark behind ``flashtile bench``.

On a GPU: flashtile against PyTorch SDPA with each backend forced (flash =
FlashAttention-2, cuDNN, efficient, math = standard attention) and
FlexAttention (compiled), on the standard grid (hidden 2048, 16k tokens per
batch), forward, backward and forward+backward; TFLOP/s counted as
FlashAttention's benchmarks count them, median of warm runs
(``triton.testing.do_bench``), plus peak memory of one forward+backward.

On a CPU: flashtile's CPU path against PyTorch's SDPA as a user calls it
(its fused CPU flash attention) and standard attention (SDPA's math backend)
at small sizes: time and peak memory.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import flashtile

MODES = ("fwd", "bwd", "fwd_bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
GPU_PROVIDERS = ("flashtile", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex")
# "sdpa": PyTorch's SDPA as a user calls it (on a CPU its fused flash attention where it applies)
CPU_PROVIDERS = ("flashtile", "sdpa", "sdpa_math")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    dtype: str
    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    nheads: int

    @property
    def hidden(self) -> int:
        return self.nheads * self.head_dim

    def flops(self, mode: str) -> float:
        f = 4.0 * self.batch * self.nheads * self.seqlen * self.seqlen * self.head_dim
        return f * MODE_FLOP_FACTOR[mode] / (2 if self.causal else 1)


@dataclass
class Result:
    case: Case
    mode: str
    provider: str
    ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    status: str = "ok"
    extra: dict = field(default_factory=dict)


def median_ms(fn, cuda: bool, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU
    (``warmup`` / ``rep`` milliseconds), three wall-clock calls after one
    warm-up call on the CPU."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def standard_grid(dtypes, head_dims, seqlens, causals, hidden=2048, tokens=16384) -> list[Case]:
    return [Case(dt, d, c, s, max(1, tokens // s), hidden // d)
            for dt in dtypes for d in head_dims for c in causals for s in seqlens]


# ---------------------------------------------------------------- providers

def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH}[name]


def make_provider(name: str, case: Case, device: str):
    """Returns (inputs, fn) where fn(*inputs) -> output; inputs require grad."""
    dtype = DTYPES[case.dtype]
    b, h, s, d = case.batch, case.nheads, case.seqlen, case.head_dim
    if name == "flashtile":
        shape = (b, s, h, d)  # its native flash_attn layout
        inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        return inputs, lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=case.causal)
    shape = (b, h, s, d)
    inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    if name == "sdpa":
        return inputs, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    if name.startswith("sdpa_"):
        from torch.nn.attention import sdpa_kernel
        backend = _sdpa_backend(name)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=case.causal)
        return inputs, fn
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # a fresh compile per shape: past dynamo's recompile limit flex would fall back to eager
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if case.causal:
            block_mask = create_block_mask(lambda b_, h_, qi, kj: qi >= kj, None, None, s, s, device=device)
        return inputs, lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    raise ValueError(f"unknown provider {name!r}")


def _timed_fn(mode: str, fn, inputs):
    if mode == "fwd":
        return lambda: fn(*inputs)
    if mode == "bwd":
        out = fn(*inputs)
        dout = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
    out = fn(*inputs)
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)


# ---------------------------------------------------------------- measuring

def _short_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]


def graph_ms(fn) -> float:
    """Median milliseconds of ``fn`` captured in a CUDA graph and replayed (L2 flushed
    before each replay, as for eager calls): the GPU's time without the host's."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def _gpu_measure(provider: str, case: Case, modes, graph: bool = False) -> list[Result]:
    from triton.testing import do_bench
    results = []
    try:
        inputs, fn = make_provider(provider, case, "cuda")
        for mode in modes:
            timed = _timed_fn(mode, fn, inputs)
            ms = do_bench(timed, warmup=25, rep=100, return_mode="median")
            res = Result(case, mode, provider, ms=ms, tflops=case.flops(mode) / ms * 1e-9)
            if graph:
                # eager time well above the graph's: the call waits on the host
                try:
                    res.extra["graph_ms"] = graph_ms(timed)
                    res.extra["graph_tflops"] = case.flops(mode) / res.extra["graph_ms"] * 1e-9
                except Exception as exc:  # not capturable (e.g. a host sync inside)
                    res.extra["graph_error"] = _short_error(exc)
            if mode == "fwd_bwd":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                timed()
                torch.cuda.synchronize()
                res.peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            results.append(res)
    except torch.cuda.OutOfMemoryError:
        results += [Result(case, m, provider, status="oom") for m in modes if m not in {r.mode for r in results}]
    except Exception as exc:  # a backend that does not support this case
        results += [Result(case, m, provider, status=_short_error(exc)) for m in modes
                    if m not in {r.mode for r in results}]
    finally:
        torch.cuda.empty_cache()
    return results


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


CPU_TIMED_MS = 500.0
CPU_MAX_REPS = 100


def _cpu_child(provider: str, case: Case, mode: str, reps: int, threads: int, conn) -> None:
    """Runs in a process of its own so that its peak resident memory is its own, with
    the caller's number of threads (torch.set_num_threads before the benchmark)."""
    torch.set_num_threads(threads)
    inputs, fn = make_provider(provider, case, "cpu")
    timed = _timed_fn(mode, fn, inputs)
    base = _rss_kib("VmRSS")
    times = []
    # a warm-up call, then at least ``reps`` timed calls and more while they add up to less
    # than CPU_TIMED_MS (short calls on a shared CPU vary by tens of percent from call to call)
    while len(times) < reps + 1 or (sum(times[1:]) < CPU_TIMED_MS and len(times) <= CPU_MAX_REPS):
        t0 = time.perf_counter()
        timed()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = _rss_kib("VmHWM")
    conn.send((statistics.median(times[1:]), (peak - base) / 1024))
    conn.close()


def _cpu_measure(provider: str, case: Case, modes, reps: int = 3) -> list[Result]:
    import multiprocessing as mp
    # children forked from a server that imported torch but ran nothing: a fork of this
    # process after torch's CPU threads have run can hang in the child
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "flashtile"])
    results = []
    for mode in modes:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_cpu_child, args=(provider, case, mode, reps, torch.get_num_threads(), child))
        proc.start()
        proc.join()
        if proc.exitcode == 0 and parent.poll():
            ms, peak = parent.recv()
            results.append(Result(case, mode, provider, ms=ms, tflops=case.flops(mode) / ms * 1e-9, peak_mib=peak))
        else:
            results.append(Result(case, mode, provider, status=f"exit code {proc.exitcode}"))
    return results


# ---------------------------------------------------------------- reporting

def _fmt(r: Result | None, digits=0) -> str:
    if r is None:
        return "-"
    if r.status != "ok":
        return "oom" if r.status == "oom" else "n/a"
    return f"{r.tflops:.{digits}f}"


def print_tables(results: list[Result], providers, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    by_key = {}
    for r in results:
        by_key[(r.case.dtype, r.case.head_dim, r.case.causal, r.case.seqlen, r.mode, r.provider)] = r
    groups = sorted({(r.case.dtype, r.case.head_dim, r.case.causal, r.mode) for r in results},
                    key=lambda g: (g[0], g[1], g[2], MODES.index(g[3])))
    seqlens = sorted({r.case.seqlen for r in results})
    digits = 0 if any((r.tflops or 0) > 10 for r in results) else 3
    for dt, d, causal, mode in groups:
        table = Table(title=f"{dt}, head dim {d}, {'causal' if causal else 'non-causal'}, {mode}: TFLOP/s")
        table.add_column("provider")
        for s in seqlens:
            table.add_column(str(s), justify="right")
        for p in providers:
            table.add_row(p, *[_fmt(by_key.get((dt, d, causal, s, mode, p)), digits) for s in seqlens])
        ft = [by_key.get((dt, d, causal, s, mode, "flashtile")) for s in seqlens]
        for p in providers:
            if p == "flashtile":
                continue
            cells = []
            for s, f in zip(seqlens, ft):
                o = by_key.get((dt, d, causal, s, mode, p))
                ok = f and o and f.status == "ok" and o.status == "ok"
                cells.append(f"{f.tflops / o.tflops:.2f}x" if ok else "-")
            table.add_row(f"flashtile / {p}", *cells, style="dim")
        if mode == "fwd_bwd":
            for p in providers:
                cells = [f"{r.peak_mib:.0f}" if r and r.peak_mib is not None else "-"
                         for r in (by_key.get((dt, d, causal, s, mode, p)) for s in seqlens)]
                table.add_row(f"peak MiB {p}", *cells, style="cyan")
        console.print(table)


def save_json(results: list[Result], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))


def _panel(ax, providers, title: str, ylabel: str, value, results) -> None:
    """One subplot: ``value(result)`` (None to leave it out) against seqlen, a line per provider."""
    for p in providers:
        pts = sorted((r.case.seqlen, y) for r in results
                     if r.provider == p and r.status == "ok" and (y := value(r)) is not None)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=p,
                    linewidth=2.5 if p == "flashtile" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("seqlen", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)


def save_plot(results: list[Result], providers, path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r.case.dtype, r.case.head_dim, r.case.causal, r.mode) for r in results if r.status == "ok"},
                    key=lambda g: (g[0], g[3] != "fwd", g[3], g[1], g[2]))
    if not groups:
        return False
    dtype0 = groups[0][0]
    groups = [g for g in groups if g[0] == dtype0]
    cols = len({(g[1], g[2]) for g in groups})
    memory = any(r.peak_mib is not None for r in results)
    rows = len({g[3] for g in groups}) + memory
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    col_of = {k: i for i, k in enumerate(sorted({(g[1], g[2]) for g in groups}))}
    row_of = {m: i for i, m in enumerate([m for m in MODES if m in {g[3] for g in groups}])}
    for dt, d, causal, mode in groups:
        _panel(axes[row_of[mode]][col_of[(d, causal)]], providers, f"{mode}, d={d}{', causal' if causal else ''}",
               "TFLOP/s", lambda r, dt=dt, d=d, causal=causal, mode=mode: r.tflops
               if r.mode == mode and (r.case.dtype, r.case.head_dim, r.case.causal) == (dt, d, causal) else None,
               results)
    if memory:  # peak memory beyond the inputs of one forward+backward (or of the mode measured)
        memory_mode = "fwd_bwd" if any(r.mode == "fwd_bwd" for r in results) else None
        for (d, causal), col in col_of.items():
            _panel(axes[-1][col], providers, f"peak memory, d={d}{', causal' if causal else ''}", "MiB",
                   lambda r, d=d, causal=causal: r.peak_mib
                   if memory_mode in (None, r.mode) and (r.case.dtype, r.case.head_dim, r.case.causal)
                   == (dtype0, d, causal) else None, results)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- entry point

def _usage_error(message: str):
    import sys
    print(f"flashtile bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(args) -> list[Result]:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    on_gpu = torch.cuda.is_available() and not args.cpu
    available = GPU_PROVIDERS + ("sdpa",) if on_gpu else CPU_PROVIDERS
    unavailable = [p for p in args.providers or () if p not in available]
    if unavailable:
        _usage_error(f"provider(s) {', '.join(unavailable)} not available on {'this GPU' if on_gpu else 'the CPU'} "
                     f"(available: {', '.join(available)})")
    if on_gpu:
        providers = args.providers or list(GPU_PROVIDERS)
        seqlens = args.seqlens or [512, 1024, 2048, 4096, 8192, 16384]
        cases = standard_grid(args.dtypes or ["bf16", "fp16"], args.head_dims or [64, 128, 256], seqlens,
                              args.causal, hidden=args.hidden or 2048, tokens=args.tokens or 16384)
        device_name = torch.cuda.get_device_name()
    else:
        providers = args.providers or list(CPU_PROVIDERS)
        seqlens = args.seqlens or [256, 512, 1024, 2048]
        cases = standard_grid(args.dtypes or ["fp32"], args.head_dims or [64], seqlens, args.causal,
                              hidden=args.hidden or 256, tokens=args.tokens or 2048)
        device_name = f"CPU ({torch.get_num_threads()} threads)"
    hidden = {c.hidden for c in cases}
    bad = [c.head_dim for c in cases if c.nheads < 1 or (args.hidden and c.hidden != args.hidden)]
    if bad:
        _usage_error(f"--hidden must be a multiple of every head dim (head dims {sorted(set(bad))})")
    del hidden
    modes = args.modes or list(MODES)
    results: list[Result] = []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name, "torch": torch.__version__, "flashtile": flashtile.__version__}
    if on_gpu:
        meta["triton"] = __import__("triton").__version__
    console.print(f"flashtile {flashtile.__version__} bench on [bold]{device_name}[/], torch {torch.__version__}"
                  + (f", triton {__import__('triton').__version__}" if on_gpu else ""))
    interactive = console.is_terminal
    with Progress(console=console, transient=True, disable=not interactive) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * len(providers))
        for case in cases:
            for p in providers:
                progress.update(task, description=f"{p} {case.dtype} d={case.head_dim} "
                                f"{'causal ' if case.causal else ''}seqlen {case.seqlen}")
                cell = _gpu_measure(p, case, modes, graph=args.graph) if on_gpu else _cpu_measure(p, case, modes)
                results += cell
                progress.advance(task)
                if not interactive:  # a log file gets one line per cell
                    console.print(f"{p} {case.dtype} d={case.head_dim} {'causal' if case.causal else 'full'} "
                                  f"b={case.batch} h={case.nheads} s={case.seqlen}: " + ", ".join(
                                      f"{r.mode} {r.ms:.3f} ms" if r.status == "ok" else f"{r.mode} {r.status}"
                                      for r in cell), highlight=False)
            save_json(results, out_dir / "bench.json", meta)  # keep what is done if interrupted
    print_tables(results, providers, console)
    shapes = ", ".join(sorted({f"{c.dtype} b={c.batch} h={c.nheads}" for c in cases}, key=len)[:3])
    plotted = save_plot(results, providers, out_dir / "bench.png",
                        f"flashtile vs baselines on {device_name}: {shapes}, hidden {cases[0].hidden}")
    console.print(f"wrote {out_dir / 'bench.json'}" + (f" and {out_dir / 'bench.png'}" if plotted else
                                                       " (install matplotlib for the plot)"))
    return results

