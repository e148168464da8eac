"""Compile the kernels for Hopper (sm90) on a machine without a GPU, through the
real launchers, and report each launch's registers, spills and shared memory
(or write its PTX / TTGIR), so kernel changes can be checked before a GPU run.

    python benchmarks/tools/sm90_compile.py --head-dim 128 --seqlen 1024 --causal 1 --pass fwd
    python benchmarks/tools/sm90_compile.py --pass fwd,bwd --window 4096,0 --dump /tmp/ptx

Triton compiles for a target given on the host (``GPUTarget("cuda", 90, 32)``),
and its bundled ``ptxas`` / ``cuobjdump`` assemble and report. Launches are
replaced by ``warmup`` (compile only). Tensors live on the CPU; the launchers
see compute capability 9.0, so they pick the Hopper tables, descriptors and
tiles that an H100/H200 would get for the same shapes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
# the Triton kernels (the Gluon forward, which Hopper calls take where it measured faster,
# has benchmarks/tools/gluon_compile.py)
os.environ.setdefault("FLASHTILE_GLUON", "0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _HostOnlyDriver:
    """Just enough of a Triton driver to compile for sm90 without a GPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled: list[tuple[str, dict, object]] = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _real_run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")},
                     kernel))
    return kernel


_real_run = JITFunction.run


def _resource_usage(kernel) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return f"regs {regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--window", default="-1,-1", help="left,right")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"],
                    help="fp8: e4m3 q, k, v with per-head descales (--fp8-v: V's layout), forward only")
    ap.add_argument("--fp8-v", default="seq", choices=["seq", "row"],
                    help="FP8 V sequence-major (as the launcher passes it) or as given")
    ap.add_argument("--pass", dest="passes", default="fwd",
                    help="fwd, bwd, decode (one token of 32 query heads / 8 kv heads against a cache of "
                         "--seqlen keys in 16 splits; --page-size for a paged one), sparse (block-sparse "
                         "forward and backward, a causal band of 300 keys in 128 x 128 blocks), paged (varlen "
                         "forward over a paged cache, --page-size keys a page, default 256), or a list: fwd,bwd")
    ap.add_argument("--page-size", type=int, default=0)
    ap.add_argument("--dump", default=None, help="folder for .ptx and .ttgir of each launch")
    ap.add_argument("--force", action="append", default=[], metavar="NAME=BMxBNxWARPSxSTAGES[h]",
                    help="launch-table name and the config to force on it (repeatable), e.g. dkdv_tma=64x64x8x2")
    args = ap.parse_args()

    from flashtile.backends.triton.launch import attention as launch_attention
    from flashtile.backends.triton.launch import decode, device
    from flashtile.backends.triton.launch.choose import force_config
    from flashtile.backends.triton.launch.table import LaunchConfig
    from flashtile.options import AttnOptions

    driver.set_active(_HostOnlyDriver())
    JITFunction.run = _compile_only
    device.ASSUMED_CAPABILITY = (9, 0)
    launch_attention.tma_compatible = lambda *tensors: True  # CPU tensors: alignment as on the GPU
    forced = {}
    for item in args.force:
        name, cfg = item.split("=")
        forced[name] = LaunchConfig.parse(cfg)
    with force_config(forced):
        compile_passes(args, launch_attention, decode, AttnOptions)
    report(args)


def compile_passes(args, launch_attention, decode, AttnOptions) -> None:
    """Run the launchers of the passes ``args.passes`` (compiling, not launching)."""
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32, fp8=torch.float8_e4m3fn)[args.dtype]
    shape = (args.batch, args.seqlen, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    fp8 = None
    if dtype == torch.float8_e4m3fn:
        from flashtile.ops.fp8 import sequence_major

        descale = torch.ones(args.batch, args.heads)
        fp8 = (descale, descale, descale, torch.bfloat16)
        if args.fp8_v == "seq":
            v = sequence_major(v)
    left, right = map(int, args.window.split(","))
    if args.causal:
        right = 0
    opts = AttnOptions(softmax_scale=args.head_dim ** -0.5, window_left=left, window_right=right)
    passes = args.passes.split(",")
    if "fwd" in passes:
        out, lse = launch_attention.attention_forward(q, k, v, opts, fp8=fp8)
    if "paged" in passes:
        # varlen prefill over a paged cache of --page-size keys a page (the sequences' keys)
        page = args.page_size or 256
        pages = -(-args.seqlen // page)
        kc, vc = (torch.randn(args.batch * pages, page, args.heads, args.head_dim).to(dtype) for _ in range(2))
        table = torch.arange(args.batch * pages, dtype=torch.int32).view(args.batch, pages)
        cu = torch.arange(args.batch + 1, dtype=torch.int32) * args.seqlen
        launch_attention.attention_forward(q.flatten(0, 1), kc, vc, opts, cu, cu, args.seqlen, args.seqlen,
                                           block_table=table)
    if "bwd" in passes:
        out, lse = torch.randn_like(q), torch.randn(args.batch, args.heads, args.seqlen)
        launch_attention.attention_backward(torch.randn_like(q), q, k, v, out, lse, opts)
    if "sparse" in passes:
        import flashtile
        from flashtile.masks.block_mask import create_block_mask
        from flashtile.ops import attention as ops
        from flashtile.ops import block_sparse

        ops._use_triton = block_sparse._use_triton = lambda t: True  # CPU tensors, compiled for sm90
        mask = create_block_mask(lambda b, h, qi, kj: (qi >= kj) & (qi - kj < 300), None, None, args.seqlen,
                                 args.seqlen, device="cpu", block_size=128)
        qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
        out = flashtile.block_sparse_attn_func(qs, ks, vs, mask)
        out.backward(torch.randn_like(out))
    if "decode" in passes:
        # an fp8 run decodes bf16 queries against an e4m3 cache
        qd = torch.randn(args.batch, 1, 32, args.head_dim, dtype=torch.bfloat16 if fp8 else dtype)
        seqlens = torch.full((args.batch,), args.seqlen, dtype=torch.int32)
        table = None
        if args.page_size:
            pages = args.seqlen // args.page_size
            cache = (args.batch * pages, args.page_size, 8, args.head_dim)
            table = torch.arange(args.batch * pages, dtype=torch.int32).view(args.batch, pages)
        else:
            cache = (args.batch, args.seqlen, 8, args.head_dim)
        kc, vc = torch.randn(cache).to(dtype), torch.randn(cache).to(dtype)
        descales = (torch.ones(args.batch, 8), torch.ones(args.batch, 8)) if fp8 else (None, None)
        decode.decode_triton(qd, kc, vc, seqlens, None, table, None, None, 0, args.head_dim ** -0.5, left, right,
                             0.0, 16, None, *descales)


def report(args) -> None:
    """Registers, spills and shared memory of every compiled launch; PTX and TTGIR with --dump."""
    for i, (name, switches, kernel) in enumerate(compiled):
        on = {k: v for k, v in switches.items() if v not in (False, 0, None) and not k.startswith("num_")}
        ptx = kernel.asm["ptx"]
        mmas = sorted(set(re.findall(r"(wgmma\.mma_async\S*|mma\.sync\S*)", ptx)))
        print(f"{name}: shared {kernel.metadata.shared} B, {_resource_usage(kernel)}, "
              f"warps {switches.get('num_warps')}, stages {switches.get('num_stages')}; {on}; matmuls {mmas}")
        if args.dump:
            folder = Path(args.dump)
            folder.mkdir(parents=True, exist_ok=True)
            for ext in ("ptx", "ttgir"):
                (folder / f"{i}_{name}.{ext}").write_text(kernel.asm[ext])


if __name__ == "__main__":
    main()
