"""Host-side cost of one attention call: what Python and the launches take
before the GPU has work, against PyTorch SDPA's flash backend.

At short sequences the GPU finishes a call faster than the host can issue the
next one, so the host time per call is the floor of the measured time. This
script times calls back to back on tiny inputs (GPU work negligible: the time
per call is the host's) and, with ``--profile``, prints where flashtile's
host time goes (cProfile, by own time).

    python benchmarks/host_overhead.py --profile
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import flashtile
from flashtile.bench import graph_ms


def enqueue_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn`` issued back to back without waiting for the GPU
    (fewer calls than the launch queue holds: the host's time alone; median of 5 rounds)."""
    rounds = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds[1:])[2]


def per_call_us(fn, calls: int = 2000) -> float:
    """Microseconds per call of ``fn`` issued back to back (median of 5 rounds)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def cases(b: int, s: int, h: int, d: int, causal: bool):
    """name -> zero-argument function, for flashtile and SDPA flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    qt, kt, vt = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout, dout_t = torch.randn_like(q), torch.randn_like(qt)

    def ft_fwd():
        return flashtile.flash_attn_func(q, k, v, causal=causal)

    def ft_fwd_nograd():
        with torch.no_grad():
            return flashtile.flash_attn_func(q, k, v, causal=causal)

    def ft_fwd_bwd():
        ft_fwd().backward(dout)

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        sdpa_fwd().backward(dout_t)

    return {"flashtile fwd": ft_fwd, "flashtile fwd (no grad)": ft_fwd_nograd, "flashtile fwd+bwd": ft_fwd_bwd,
            "sdpa_flash fwd": sdpa_fwd, "sdpa_flash fwd+bwd": sdpa_fwd_bwd}


def launch_detail() -> None:
    """Host time of each layer of one forward and one backward call (tiny inputs)."""
    from flashtile.api import launch, ops

    q, k, v = (torch.randn(1, 128, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    opts = ops.attn_options(q, k, None, None, None, 128**-0.5, 0, -1, 0, 0.0, 0.0, False)
    out, lse = launch.attention_forward(q, k, v, opts)
    dout = torch.randn_like(out)
    launches = []
    real_launch = launch._launch

    def recording_launch(name, kernel, grid_fn, args, constexprs, tensor, block_d, seqlens=(0, 0), dry=False):
        launches.append((name, kernel, grid_fn, args, constexprs, tensor, block_d))
        return real_launch(name, kernel, grid_fn, args, constexprs, tensor, block_d, seqlens, dry)

    launch._launch = recording_launch
    launch.clear_caches()  # the calls below build their launches (no plan to replay)
    launch.attention_forward(q, k, v, opts)
    launch.attention_backward(dout, q, k, v, out, lse, opts)
    launch._launch = real_launch
    def without_plans(fn):
        def call():
            launch._plans.clear()
            fn()
        return call

    rows = {
        "attention_forward (launch layer, plan replayed)": lambda: launch.attention_forward(q, k, v, opts),
        "attention_backward (launch layer, plan replayed)":
            lambda: launch.attention_backward(dout, q, k, v, out, lse, opts),
        "attention_forward (launch layer, no plan)": without_plans(lambda: launch.attention_forward(q, k, v, opts)),
        "attention_backward (launch layer, no plan)":
            without_plans(lambda: launch.attention_backward(dout, q, k, v, out, lse, opts)),
        "torch.cuda.get_device_capability": lambda: torch.cuda.get_device_capability(q.device),
        "torch.empty_like": lambda: torch.empty_like(q),
    }
    for name, kernel, grid_fn, args, constexprs, tensor, block_d in launches:
        cfg = launch._chosen[next(key for key in launch._chosen if key[0] == name)]
        grid, call_args = grid_fn(cfg), args(cfg) if callable(args) else args
        kwargs = dict(constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        rows[f"_launch('{name}')"] = (lambda n=name, kn=kernel, g=grid_fn, a=args, c=constexprs, t=tensor, b=block_d:
                                      launch._launch(n, kn, g, a, c, t, b))
        rows[f"  triton launch alone ({len(call_args)} args, {len(kwargs)} keywords)"] = (
            lambda kn=kernel, g=grid, a=call_args, kw=kwargs: kn[g](*a, **kw))
    print("\nhost time per call of each layer (tiny inputs):")
    for name, fn in rows.items():
        print(f"  {name:58s} {per_call_us(fn, calls=1000):7.1f} us  (enqueue alone {enqueue_us(fn):7.1f} us)")


def triton_layers(b: int = 1, s: int = 128, h: int = 2, d: int = 128) -> None:
    """Host time of each step inside one Triton launch of the forward kernel (a
    standard-grid shape, causal): binding and specialising the arguments, the cache
    key, the checks, and the compiled kernel's own launcher called directly."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import compute_cache_key

    from flashtile.api import launch, ops

    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    opts = ops.attn_options(q, k, None, None, None, d**-0.5, 0, -1, 0, 0.0, 0.0, False)
    recorded = []
    real_launch = launch._launch

    def recording_launch(name, kernel, grid_fn, args, constexprs, tensor, block_d, seqlens=(0, 0), dry=False):
        recorded.append((name, kernel, grid_fn, args, constexprs))
        return real_launch(name, kernel, grid_fn, args, constexprs, tensor, block_d, seqlens, dry)

    launch._launch = recording_launch
    launch.clear_caches()
    launch.attention_forward(q, k, v, opts)
    launch._launch = real_launch
    name, kernel, grid_fn, args, constexprs = recorded[0]
    cfg = launch._chosen[next(key for key in launch._chosen if key[0] == name)]
    grid, call_args = grid_fn(cfg), args(cfg) if callable(args) else args
    kwargs = dict(constexprs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    compiled = kernel[grid](*call_args, **kwargs)
    device = driver.active.get_current_device()
    kernel_cache, key_cache, _, _, binder = kernel.device_caches[device]
    full_kwargs = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, options = binder(*call_args, **full_kwargs)
    values = tuple(bound.values())
    stream = driver.active.get_current_stream(device)

    def globals_check():
        for (gname, _), (val, globals_dict) in kernel.used_global_vals.items():
            if globals_dict.get(gname) != val:
                raise RuntimeError(gname)

    rows = {
        f"kernel[grid](...) ('{name}', {len(call_args)} args, {len(kwargs)} keywords)":
            lambda: kernel[grid](*call_args, **kwargs),
        "  binder (bind + specialise)": lambda: binder(*call_args, **full_kwargs),
        "  compute_cache_key": lambda: compute_cache_key(key_cache, spec, options),
        "  kernel_cache.get": lambda: kernel_cache.get(compute_cache_key(key_cache, spec, options)),
        f"  used-globals check ({len(kernel.used_global_vals)} globals)": globals_check,
        "  current device + stream": lambda: driver.active.get_current_stream(driver.active.get_current_device()),
        "  compiled.run (the launcher alone)": lambda: compiled.run(
            grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *values),
        "launch layer args(cfg)": lambda: args(cfg) if callable(args) else args,
    }
    print(f"\nhost time per step of one forward launch (b{b}, s{s}, h{h}, d{d}, causal, bf16):")
    for row, fn in rows.items():
        print(f"  {row:58s} {per_call_us(fn, calls=1000):7.1f} us  (enqueue alone {enqueue_us(fn):7.1f} us)")


def grid_cases() -> None:
    """The standard grid's 1k cases: eager calls against CUDA-graph replays (GPU alone)."""
    from triton.testing import do_bench

    print("\nstandard-grid cases at seqlen 1k (b16, hidden 2048, bf16): ms per call issued eagerly,"
          " ms per CUDA-graph replay (GPU alone)")
    for d in (64, 128, 256):
        for causal in (False, True):
            fns = cases(16, 1024, 2048 // d, d, causal)
            for name in ("flashtile fwd", "sdpa_flash fwd", "flashtile fwd+bwd", "sdpa_flash fwd+bwd"):
                eager = do_bench(fns[name], warmup=25, rep=100, return_mode="median")
                try:
                    graph = graph_ms(fns[name])
                except RuntimeError as exc:  # not capturable
                    print(f"  ({name}: no CUDA graph: {exc})")
                    graph = float("nan")
                print(f"  d{d:<3d} {'causal' if causal else 'full  '} {name:20s} eager {eager:7.4f}  graph {graph:7.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true", help="cProfile flashtile's forward and forward+backward")
    ap.add_argument("--grid", action="store_true", help="also the standard grid's 1k cases, eager and graphed")
    args = ap.parse_args()
    fns = cases(1, 128, 2, 128, causal=True)
    print("host time per call, tiny inputs (b1, s128, h2, d128, causal, bf16):")
    for name, fn in fns.items():
        print(f"  {name:26s} {per_call_us(fn):7.1f} us  (enqueue alone {enqueue_us(fn):7.1f} us)")
    launch_detail()
    triton_layers()
    if args.grid:
        grid_cases()
    if args.profile:
        for name in ("flashtile fwd", "flashtile fwd+bwd"):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(2000):
                fns[name]()
            torch.cuda.synchronize()
            profile.disable()
            print(f"\n== cProfile, 2000 calls of {name}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
