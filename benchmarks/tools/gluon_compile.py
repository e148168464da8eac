"""Compile the Gluon kernels for Hopper (sm90) on a machine without a GPU and
report each one's registers, spills (stack), shared memory and matmuls.

    python benchmarks/tools/gluon_compile.py                      # every forward kernel, head dim 128, causal and not
    python benchmarks/tools/gluon_compile.py --kernel ws --head-dim 64 --dump /tmp/gluon
    python benchmarks/tools/gluon_compile.py --kernel dkdv,dkdv_ws --head-dim 64,128   # the backward's dK/dV kernels

Same host-only driver as ``sm90_compile.py`` (``GPUTarget("cuda", 90, 32)``,
launches replaced by compilation); CPU tensors go through the real launcher
``flashtile.backends.triton.launch.gluon.gluon_forward`` (and ``gluon_backward_dkdv``
for the kernel named ``dkdv``, full attention only).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sm90_compile
import torch
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction


def compile_gluon(kernels=("simple", "ws", "pingpong"), head_dims=(128,), causals=(False, True), dtype="bf16",
                  seqlen=1024, heads=(16, 4)) -> list[tuple[str, dict, object]]:
    """Compile the Gluon kernels for sm90 on the host; returns sm90_compile's
    (name, switches, compiled kernel) records."""
    from flashtile.backends.triton.launch import device
    from flashtile.backends.triton.launch.gluon import gluon_backward_dkdv, gluon_forward

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    saved = (driver._active, JITFunction.run, device.ASSUMED_CAPABILITY)
    driver.set_active(sm90_compile._HostOnlyDriver())
    JITFunction.run = sm90_compile._compile_only
    device.ASSUMED_CAPABILITY = (9, 0)
    sm90_compile.compiled.clear()
    try:
        for head_dim in head_dims:
            q = torch.randn(1, seqlen, heads[0], head_dim).to(torch_dtype)
            k, v = (torch.randn(1, seqlen, heads[1], head_dim).to(torch_dtype) for _ in range(2))
            for kernel in kernels:
                if kernel in ("dkdv", "dkdv_ws"):  # one key/value head per query head, then GQA
                    lse = torch.zeros(1, heads[0], seqlen)
                    # the warp-specialised form: full attention only
                    for causal in causals if kernel == "dkdv" else (False, ):
                        for kv_heads in (heads[0], heads[1]):
                            kk, vv = (torch.randn(1, seqlen, kv_heads, head_dim).to(torch_dtype) for _ in range(2))
                            gluon_backward_dkdv(q, kk, vv, torch.randn_like(q), lse, lse.clone(),
                                                torch.empty_like(kk), torch.empty_like(vv), head_dim ** -0.5, causal,
                                                kernel="simple" if kernel == "dkdv" else "ws")
                    continue
                for causal in causals:
                    gluon_forward(q, k, v, head_dim ** -0.5, causal, kernel=kernel)
    finally:
        driver._active = saved[0]
        JITFunction.run, device.ASSUMED_CAPABILITY = saved[1], saved[2]
    return list(sm90_compile.compiled)


def describe(name: str, switches: dict, kernel) -> str:
    ptx = kernel.asm["ptx"]
    mmas = sorted(set(re.findall(r"wgmma\.mma_async\S*", ptx)))
    regs = sorted({int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)})
    threads = re.search(r"\.reqntid (\d+)", ptx)
    on = {k: v for k, v in switches.items()
          if k in ("HEAD_D", "CAUSAL", "PINGPONG", "STAGES", "BLOCK_M", "BLOCK_N", "GQA")}
    return (f"{name}: shared {kernel.metadata.shared} B, {sm90_compile._resource_usage(kernel)}, "
            f"warps {switches.get('num_warps')} ({threads.group(1) if threads else '?'} threads), setmaxnreg {regs}; "
            f"{on}; matmuls {mmas}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="simple,ws,pingpong", help="forward kernels, or dkdv / dkdv_ws (the backward's)")
    ap.add_argument("--head-dim", default="128", help="64, 128 or 64,128")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--dump", default=None, help="folder for the .ptx and .ttgir of each kernel")
    args = ap.parse_args()
    start = time.time()
    records = compile_gluon(tuple(args.kernel.split(",")), tuple(int(d) for d in args.head_dim.split(",")),
                            tuple(bool(int(c)) for c in args.causal.split(",")), args.dtype)
    for i, (name, switches, kernel) in enumerate(records):
        print(describe(name, switches, kernel))
        if args.dump:
            folder = Path(args.dump)
            folder.mkdir(parents=True, exist_ok=True)
            for ext in ("ptx", "ttgir"):
                (folder / f"{i}_{name}.{ext}").write_text(kernel.asm[ext])
    print(f"compiled {len(records)} kernels in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
