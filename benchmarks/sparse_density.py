"""Block-sparse attention: time against the fraction of tiles kept, beside dense
flashtile and FlexAttention given the same block mask.

    python benchmarks/sparse_density.py [--seqlen 16384] [--densities 0.05,0.1,...] \\
        [--long 65536,131072] [--out docs/results/h200_block_sparse]

Rows (bf16 on a GPU, batch 1, 16 heads, head dim 128, blocks of 128):

* ``sparse``: ``flashtile.block_sparse_attn_func`` with a random block layout
  per head keeping the given fraction of tiles (each query block keeps at
  least its diagonal tile); ``density`` is the fraction actually kept;
* ``flex``: ``torch.nn.attention.flex_attention`` (compiled) with a Flex block
  mask built from the same layout;
* ``dense``: ``flashtile.flash_attn_func`` on the same inputs (non-causal).

Columns: forward and forward+backward milliseconds (medians of warm runs,
``triton.testing.do_bench``), the speed-up over dense flashtile, flashtile's
time per non-empty tile (flat when time is linear in the tiles), and the
flashtile / flex time ratio. ``--long`` times sparse forward+backward at longer
sequences (a band of blocks plus random blocks, about 3% of the tiles), with
the peak memory. On a CPU, sizes shrink to a smoke test (tiled PyTorch path).
"""

from __future__ import annotations

import argparse
import json

import torch

import flashtile
from flashtile import BlockMask, block_sparse_attn_func, flash_attn_func
from flashtile.cli.bench import median_ms


def fwd_and_fwd_bwd(fn, inputs, cuda: bool) -> tuple[float | str, float | str]:
    """(forward ms, forward+backward ms) of fn(); "oom" where it does not fit."""
    dout = torch.randn_like(inputs[0])

    def step():
        torch.autograd.grad(fn(), inputs, dout)

    results = []
    for mode in ("fwd", "fwd_bwd"):
        try:
            if mode == "fwd":
                with torch.no_grad():
                    results.append(median_ms(fn, cuda, warmup=10, rep=50))
            else:
                results.append(median_ms(step, cuda, warmup=10, rep=50))
        except torch.OutOfMemoryError:
            results.append("oom")
        if cuda:
            torch.cuda.empty_cache()
    return tuple(results)


def random_layout(heads: int, n_blocks: int, density: float, device, seed: int = 0) -> torch.Tensor:
    """(heads, n, n) bool: each tile kept with probability ``density``, the diagonal always."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layout = torch.rand(heads, n_blocks, n_blocks, generator=gen) < density
    layout |= torch.eye(n_blocks, dtype=torch.bool)
    return layout.to(device)


def flex_runner(q, k, v, layout: torch.Tensor | None, block: int, causal: bool = False):
    """FlexAttention on flash-layout inputs with the block mask of ``layout`` (heads, n, n), or causal."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    seqlen = q.shape[1]

    if causal:
        def mask_mod(b, h, i, j):
            return j <= i
    else:
        def mask_mod(b, h, i, j):
            return layout[h, i // block, j // block]

    heads = None if causal else layout.shape[0]
    mask = create_block_mask(mask_mod, None, heads, seqlen, seqlen, device=q.device, BLOCK_SIZE=block)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: compiled(qt, kt, vt, block_mask=mask).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--seqlen", type=int, default=16384 if cuda else 512)
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,0.75,1.0" if cuda else "0.1,0.5,1.0")
    parser.add_argument("--heads", type=int, default=16 if cuda else 2)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    parser.add_argument("--block-size", type=int, default=128 if cuda else 64)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--long", default="", help="comma-separated sequence lengths for the long runs")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    block, heads, dim, seqlen = args.block_size, args.heads, args.head_dim, args.seqlen
    use_flex = cuda and not args.no_flex
    n_blocks = -(-seqlen // block)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, seqlen, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    inputs = (q, k, v)
    rows = []

    dense = fwd_and_fwd_bwd(lambda: flash_attn_func(q, k, v), inputs, cuda)
    rows.append(dict(provider="dense", density=1.0, tiles=heads * n_blocks * n_blocks, fwd=dense[0], fwd_bwd=dense[1]))
    print(f"{'density':>8} {'tiles':>7} {'fwd ms':>8} {'x dense':>8} {'fwd+bwd':>8} {'x dense':>8} "
          f"{'us/tile':>8} {'flex fwd':>9} {'flex f+b':>9} {'ft/flex':>8}")
    print(f"{'dense':>8} {rows[0]['tiles']:>7} {dense[0]:>8.3f} {'':>8} {dense[1]:>8.3f}")

    def record(name, mask, layout=None, causal=False):
        tiles = int((mask.tiles != -2).sum()) * (heads if mask.tiles.shape[1] == 1 else 1)
        fwd, fwd_bwd = fwd_and_fwd_bwd(lambda: block_sparse_attn_func(q, k, v, mask), inputs, cuda)
        flex = ("n/a", "n/a")
        if use_flex:
            try:
                flex = fwd_and_fwd_bwd(flex_runner(q, k, v, layout, block, causal), inputs, cuda)
            except Exception as exc:  # recorded, not fatal: Flex versions differ
                print(f"flex failed: {type(exc).__name__}: {str(exc)[:200]}")
        row = dict(provider=name, density=mask.density(), tiles=tiles, fwd=fwd, fwd_bwd=fwd_bwd, flex_fwd=flex[0],
                   flex_fwd_bwd=flex[1])
        rows.append(row)

        def ratio(a, b):
            return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"

        us_tile = fwd_bwd * 1e3 / tiles if isinstance(fwd_bwd, float) else float("nan")
        flex_f = f"{flex[0]:.3f}" if isinstance(flex[0], float) else flex[0]
        flex_fb = f"{flex[1]:.3f}" if isinstance(flex[1], float) else flex[1]
        print(f"{row['density']:>8.3f} {tiles:>7} {fwd:>8.3f} {ratio(dense[0], fwd):>8} {fwd_bwd:>8.3f} "
              f"{ratio(dense[1], fwd_bwd):>8} {us_tile:>8.3f} {flex_f:>9} {flex_fb:>9} {ratio(fwd_bwd, flex[1]):>8}"
              f"  {name}")

    for density in (float(d) for d in args.densities.split(",")):
        layout = random_layout(heads, n_blocks, density, device)
        mask = BlockMask.from_layout(layout[None], block, seqlen, seqlen)
        record("sparse", mask, layout)
    record("causal", BlockMask.causal(seqlen, seqlen, block, device=device), causal=True)

    for name, ratio_target, density in (("10%", 5.0, 0.1), ("50%", 1.7, 0.5)):
        match = [r for r in rows if r["provider"] == "sparse" and abs(r["density"] - density) < 0.03]
        if match and isinstance(match[0]["fwd_bwd"], float):
            print(f"{seqlen} tokens, {name} of tiles: fwd+bwd {dense[1] / match[0]['fwd_bwd']:.2f}x faster than dense "
                  f"(target {ratio_target}x)")

    long_rows = []
    for n in (int(s) for s in args.long.split(",") if s):
        nb = -(-n // block)
        # a band of 3 blocks either side plus random blocks: about 3% of the tiles at 64k
        band = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 3
        layout = (random_layout(heads, nb, 0.02, "cpu", seed=1) | band).to(device)
        mask = BlockMask.from_layout(layout[None], block, n, n)
        ql, kl, vl = (torch.randn(1, n, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fwd, fwd_bwd = fwd_and_fwd_bwd(lambda: block_sparse_attn_func(ql, kl, vl, mask), (ql, kl, vl), cuda)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        long_rows.append(dict(seqlen=n, density=mask.density(), fwd=fwd, fwd_bwd=fwd_bwd, peak_gib=peak))
        print(f"{n} tokens, {mask.density():.3f} of tiles: fwd {fwd} ms, fwd+bwd {fwd_bwd} ms, peak {peak:.2f} GiB")
        del ql, kl, vl, mask

    if args.out:
        meta = dict(gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    flashtile=flashtile.__version__, dtype=args.dtype, seqlen=seqlen, heads=heads, head_dim=dim,
                    block_size=block)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows, long=long_rows), f, indent=1)
        plot(rows, dense, meta, args.out + ".png")


def plot(rows, dense, meta, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse = [r for r in rows if r["provider"] == "sparse" and isinstance(r["fwd_bwd"], float)]
    xs = [r["density"] for r in sparse]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [r["fwd_bwd"] for r in sparse], "o-", label="flashtile block-sparse, fwd+bwd")
    ax.plot(xs, [r["fwd"] for r in sparse], "o--", label="flashtile block-sparse, fwd")
    flex = [(r["density"], r["flex_fwd_bwd"]) for r in sparse if isinstance(r.get("flex_fwd_bwd"), float)]
    if flex:
        ax.plot(*zip(*flex), "s-", label="FlexAttention, same mask, fwd+bwd")
    if isinstance(dense[1], float):
        ax.axhline(dense[1], color="gray", ls=":", label="flashtile dense, fwd+bwd")
    ax.set_xlabel("fraction of tiles kept")
    ax.set_ylabel("ms")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, None)
    ax.set_title(f"block-sparse attention, {meta['gpu']}\n{meta['dtype']}, seqlen {meta['seqlen']}, "
                 f"{meta['heads']} heads, d={meta['head_dim']}, blocks {meta['block_size']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
