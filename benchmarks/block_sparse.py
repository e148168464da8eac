"""Block-sparse attention: time against the fraction of tiles kept, beside dense
flashtile and FlexAttention given the same block mask, all in one run.

    python benchmarks/block_sparse.py [--seqlen 16384] [--densities 0.05,0.1,...] [--modes fwd,fwd_bwd] \\
        [--no-flex] [--no-patterns] [--long 65536,131072] [--out results/block_sparse]

Inputs are ``(batch, seqlen, heads, head_dim)`` (flash_attn layout); on a GPU bf16,
batch 1, 16 heads, head dim 128, blocks of 128 x 128, seqlen 16384 unless told.

Rows (one per mask; every provider of a row sees the same inputs and mask):

* ``dense``: ``flashtile.flash_attn_func`` (the dense kernel, non-causal): the
  reference every ``x dense`` column divides by;
* ``random d``: ``flashtile.block_sparse_attn_func`` with a random block layout
  per head keeping the fraction ``d`` of the tiles (a fixed seed; every query
  block keeps its diagonal tile, so no row is empty);
* ``causal``: ``block_sparse_attn_func`` with ``BlockMask.causal``, beside
  ``dense causal`` (``flash_attn_func(causal=True)``);
* ``local+global``, ``document``: masks from ``flashtile.api.sparse_patterns``
  (a sliding window with global tokens; packed documents, causal within each),
  when that module is there.

Every sparse row is also run with FlexAttention
(``torch.nn.attention.flex_attention``, compiled) on a Flex block mask built
with Flex's ``create_block_mask`` from the same mask: the flashtile mask looked
up per element (random layouts, patterns) or ``q_idx >= kv_idx`` (causal);
``flex max diff`` is the largest difference between the two outputs.

Columns, per mode (``fwd``: forward; ``fwd_bwd``: forward + backward as one step,
``torch.autograd.grad(out, (q, k, v), dout)``):

* ``density``: fraction of the tiles that are not empty (``BlockMask.density()``);
* ``tiles``: non-empty tiles over all (batch, head);
* ``ms``: flashtile's time; ``x dense``: dense flashtile's time over it;
* ``ns/tile``: flashtile's time per non-empty tile: flat across densities when
  time is linear in the number of tiles (a least-squares line ``ms = a + b tiles``
  over the random rows is printed and saved, with its r^2);
* ``TFLOP/s``: counted on the non-empty tiles, ``4 b h tiles block_q block_k d``
  for the forward, 3.5 times that for forward + backward (partial tiles count
  whole, so causal rows read slightly high);
* ``flex ms``, ``ft/flex``: FlexAttention's time and flashtile's time over it
  (below 1: flashtile faster).

``--long`` times sparse attention at longer sequences (a band of blocks around
the diagonal plus random blocks, about 5% of the tiles) with the peak memory
(``torch.cuda.max_memory_allocated``); dense flashtile is timed beside it up to
``--long-dense-max`` tokens and otherwise estimated from the dense row scaled by
``(seqlen / seqlen_ref)^2``; "oom" where it does not fit.

Times are medians of warm runs (``triton.testing.do_bench``) on a GPU; on a CPU
(the tiled PyTorch path, or the Triton interpreter with TRITON_INTERPRET=1) the
sizes shrink to a smoke test and a plain timer takes the median of 3 runs.
``--out PATH`` writes PATH.json and PATH.png (time and time per tile vs density).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import flashtile
from flashtile import BlockMask, block_sparse_attn_func, flash_attn_func
from flashtile.api.block_mask import EMPTY

MODES = ("fwd", "fwd_bwd")
MODE_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
BWD_FLOP_FACTOR = 3.5  # forward + backward over forward: 2 matmuls forward, 5 backward


# -- timing ----------------------------------------------------------------------------

def timer(fn, cuda: bool) -> float:
    """Median milliseconds of fn()."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn, inputs, mode: str, cuda: bool) -> tuple[float | str, float | None]:
    """(milliseconds of one forward or forward+backward step of fn(), peak GiB on a GPU); "oom" if it does not fit."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        if mode == "fwd":
            with torch.no_grad():
                ms = timer(fn, cuda)
        else:
            dout = torch.randn_like(inputs[0])

            def step():
                torch.autograd.grad(fn(), inputs, dout)
            ms = timer(step, cuda)
    except torch.OutOfMemoryError:
        ms = "oom"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.empty_cache()
    return ms, peak


# -- masks -----------------------------------------------------------------------------

def random_layout(heads: int, n_blocks: int, density: float, seed: int = 0, band: int = 0) -> torch.Tensor:
    """bool ``(heads, n, n)`` on the CPU: every tile with ``|q_block - k_block| <= band`` (the
    diagonal for band 0) plus tiles drawn uniformly at random (a ``torch.Generator`` seeded
    with ``seed``) up to ``round(density n^2)`` tiles per head."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(n_blocks)
    forced = ((idx[:, None] - idx[None, :]).abs() <= band).flatten()
    keep = min(n_blocks * n_blocks, max(round(density * n_blocks * n_blocks), int(forced.sum())))
    scores = torch.rand(heads, n_blocks * n_blocks, generator=gen)
    scores[:, forced] = -1.0  # drawn first
    chosen = scores.topk(keep, dim=-1, largest=False).indices
    layout = torch.zeros(heads, n_blocks * n_blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    return layout.reshape(heads, n_blocks, n_blocks)


def count_tiles(mask: BlockMask, batch: int, heads: int) -> int:
    """Non-empty tiles over all (batch, head), broadcast dims expanded."""
    b, h = mask.shape[:2]
    return int((mask.tiles != EMPTY).sum()) * (batch // b) * (heads // h)


def pattern_masks(seqlen: int, block: int, device) -> list[tuple[str, BlockMask]]:
    """Masks from flashtile.api.sparse_patterns (skipped if the module or a builder is missing)."""
    try:
        from flashtile.api import sparse_patterns as sp
    except ImportError:
        print("(flashtile.api.sparse_patterns not found: local+global and document rows skipped)")
        return []
    out = []
    builders = {
        # window of seqlen/16 keys either side, the first block of tokens global
        "local+global": lambda: sp.local_global_block_mask(seqlen, window=max(block, seqlen // 16),
                                                           global_tokens=block, block_size=block, device=device),
        # 8 packed documents of random lengths, causal within each
        "document": lambda: sp.document_block_mask(sp.document_ids_from_lengths(_doc_lengths(seqlen, 8), device),
                                                   block_size=block, device=device, causal=True),
    }
    for name, build in builders.items():
        try:
            out.append((name, build()))
        except Exception as exc:  # a builder that is not there (yet) or refuses the sizes
            print(f"({name} mask not built: {type(exc).__name__}: {str(exc)[:160]})")
    return out


def _doc_lengths(seqlen: int, n_docs: int) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    cuts = sorted(torch.randperm(seqlen - 1, generator=gen)[:n_docs - 1].add(1).tolist())
    edges = [0] + cuts + [seqlen]
    return [b - a for a, b in zip(edges, edges[1:])]


# -- FlexAttention -----------------------------------------------------------------------

_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled kernel per mask kind and mode: leave room so that none falls back to eager
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _lookup_mask_mod(mask: BlockMask):
    """Flex predicate equal to ``mask``: the tile kind, then the pattern's element for partial tiles."""
    bq, bk = mask.block_size
    dev = mask.device
    table = torch.cat([torch.zeros(1, bq, bk, dtype=torch.bool, device=dev),
                       torch.ones(1, bq, bk, dtype=torch.bool, device=dev), mask.patterns])
    tiles = mask.tiles.to(torch.int64) + 2  # EMPTY -> 0, FULL -> 1, pattern p -> p + 2
    per_batch, per_head = tiles.shape[0] > 1, tiles.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        tile = tiles[b if per_batch else 0, h if per_head else 0, q_idx // bq, kv_idx // bk]
        return table[tile, q_idx % bq, kv_idx % bk]

    return mask_mod


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_fn(q, k, v, mask: BlockMask, causal: bool = False):
    """FlexAttention on flash-layout inputs with a Flex block mask equal to ``mask``."""
    from torch.nn.attention.flex_attention import create_block_mask as flex_block_mask

    flex = _compiled_flex()
    b, h = mask.shape[:2]
    mask_mod = _causal_mask_mod if causal else _lookup_mask_mod(mask)
    fmask = flex_block_mask(mask_mod, b if b > 1 else None, h if h > 1 else None, mask.seqlen_q, mask.seqlen_k,
                            device=q.device, BLOCK_SIZE=mask.block_size)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: flex(qt, kt, vt, block_mask=fmask).transpose(1, 2)


# -- rows --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, device: str):
        self.args = args
        self.device = device
        self.cuda = device == "cuda"
        self.dtype = getattr(torch, args.dtype)
        torch.manual_seed(0)
        shape = (args.batch, args.seqlen, args.heads, args.head_dim)
        self.q, self.k, self.v = (torch.randn(shape, device=device, dtype=self.dtype, requires_grad=True)
                                  for _ in range(3))
        self.inputs = (self.q, self.k, self.v)
        self.rows: list[dict] = []
        self.dense: dict = {}

    def tile_flops(self, tiles: int) -> float:
        """Forward FLOPs over ``tiles`` tiles of the mask's block size."""
        return 4.0 * tiles * self.args.block_size ** 2 * self.args.head_dim

    def _fill(self, row: dict, prefix: str, fn, inputs, tiles: int) -> None:
        for mode in self.args.modes:
            ms, _ = measure(fn, inputs, mode, self.cuda)
            row[f"{mode}_{prefix}ms"] = ms
            if prefix == "" and isinstance(ms, float):
                flops = self.tile_flops(tiles) * (BWD_FLOP_FACTOR if mode == "fwd_bwd" else 1.0)
                row[f"{mode}_ns_per_tile"] = ms * 1e6 / tiles
                row[f"{mode}_tflops"] = flops / (ms * 1e-3) / 1e12

    def add_dense(self, causal: bool) -> dict:
        a = self.args
        n = -(-a.seqlen // a.block_size)
        tiles = a.batch * a.heads * (n * (n + 1) // 2 if causal else n * n)
        row = dict(pattern="dense causal" if causal else "dense", provider="flash_attn_func", density=1.0,
                   tiles=tiles)
        if causal:
            row["density"] = tiles / (a.batch * a.heads * n * n)
        self._fill(row, "", lambda: flash_attn_func(self.q, self.k, self.v, causal=causal), self.inputs, tiles)
        if not causal:
            self.dense = row
        self._finish(row)
        return row

    def add_sparse(self, pattern: str, mask: BlockMask, requested=None, flex_causal: bool = False) -> dict:
        a = self.args
        tiles = count_tiles(mask, a.batch, a.heads)
        row = dict(pattern=pattern, provider="block_sparse_attn_func", requested_density=requested,
                   density=mask.density(), tiles=tiles)
        fn = lambda: block_sparse_attn_func(self.q, self.k, self.v, mask)  # noqa: E731
        self._fill(row, "", fn, self.inputs, tiles)
        if a.flex:
            try:
                flex = flex_fn(self.q, self.k, self.v, mask, causal=flex_causal)
                with torch.no_grad():
                    row["flex_max_diff"] = (flex().float() - fn().float()).abs().max().item()
                self._fill(row, "flex_", flex, self.inputs, tiles)
            except Exception as exc:  # recorded, not fatal: Flex differs between torch versions
                row["flex_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                print(f"  flex failed on {pattern}: {row['flex_error']}")
        for mode in a.modes:
            row.setdefault(f"{mode}_flex_ms", "n/a")
        self._finish(row)
        return row

    def _finish(self, row: dict) -> None:
        for mode in self.args.modes:
            ms, dense = row.get(f"{mode}_ms"), self.dense.get(f"{mode}_ms")
            row[f"{mode}_speedup"] = _ratio(dense, ms)
            row[f"{mode}_flex_speedup"] = _ratio(dense, row.get(f"{mode}_flex_ms"))
            row[f"{mode}_ft_over_flex"] = _ratio(ms, row.get(f"{mode}_flex_ms"))
        self.rows.append(row)
        print(f"  {row['pattern']}: " + ", ".join(f"{m} {_cell(row.get(f'{m}_ms'))} ms" for m in self.args.modes),
              flush=True)
        if self.cuda:
            torch.cuda.empty_cache()


def run_long(args, device: str, dense_row: dict) -> list[dict]:
    """Sparse attention at long sequences, with its peak memory; dense beside it while it is affordable."""
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype)
    rows = []
    for seqlen in args.long:
        n = -(-seqlen // args.block_size)
        layout = random_layout(args.heads, n, args.long_density, seed=2, band=args.long_band).to(device)
        mask = BlockMask.from_layout(layout, args.block_size, seqlen, seqlen)
        del layout
        tiles = count_tiles(mask, args.batch, args.heads)
        row = dict(seqlen=seqlen, density=mask.density(), tiles=tiles, band_blocks=args.long_band)
        shape = (args.batch, seqlen, args.heads, args.head_dim)
        try:
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        except torch.OutOfMemoryError:
            row.update({f"{m}_ms": "oom" for m in args.modes})
            rows.append(row)
            continue
        scale = (seqlen / args.seqlen) ** 2
        for mode in args.modes:
            ms, peak = measure(lambda: block_sparse_attn_func(q, k, v, mask), (q, k, v), mode, cuda)
            row[f"{mode}_ms"], row[f"{mode}_peak_gib"] = ms, peak
            if isinstance(ms, float):
                flops = 4.0 * tiles * args.block_size ** 2 * args.head_dim
                row[f"{mode}_tflops"] = flops * (BWD_FLOP_FACTOR if mode == "fwd_bwd" else 1.0) / (ms * 1e-3) / 1e12
                row[f"{mode}_ns_per_tile"] = ms * 1e6 / tiles
            ref = dense_row.get(f"{mode}_ms")
            row[f"{mode}_dense_estimate_ms"] = ref * scale if isinstance(ref, float) else None
            if seqlen <= args.long_dense_max:
                dms, dpeak = measure(lambda: flash_attn_func(q, k, v), (q, k, v), mode, cuda)
                row[f"{mode}_dense_ms"], row[f"{mode}_dense_peak_gib"] = dms, dpeak
            row[f"{mode}_speedup"] = _ratio(row.get(f"{mode}_dense_ms", row[f"{mode}_dense_estimate_ms"]), ms)
        print(f"  {seqlen} tokens: " + ", ".join(f"{m} {_cell(row.get(f'{m}_ms'))} ms" for m in args.modes),
              flush=True)
        rows.append(row)
        del q, k, v, mask
        if cuda:
            torch.cuda.empty_cache()
    return rows


# -- report ------------------------------------------------------------------------------

def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def _cell(x, fmt: str = ".3f", width: int = 0) -> str:
    s = format(x, fmt) if isinstance(x, float) else ("-" if x is None else str(x))
    return f"{s:>{width}}" if width else s


def linear_fit(rows: list[dict], mode: str) -> dict | None:
    """Least-squares ``ms = a + b tiles`` over the random-layout rows, with r^2."""
    pts = [(r["tiles"], r[f"{mode}_ms"]) for r in rows
           if r["pattern"].startswith("random") and isinstance(r.get(f"{mode}_ms"), float)]
    if len(pts) < 3:
        return None
    xs, ys = zip(*pts)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    ss_tot = sum((y - my) ** 2 for y in ys)
    return dict(intercept_ms=intercept, ns_per_tile=slope * 1e6, r2=1 - ss_res / ss_tot if ss_tot else 1.0)


def print_table(rows: list[dict], mode: str) -> None:
    head = (f"{'pattern':<14} {'density':>7} {'tiles':>8} {'ms':>9} {'x dense':>7} {'ns/tile':>8} {'TFLOP/s':>7}"
            f" {'flex ms':>9} {'x dense':>7} {'ft/flex':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['pattern']:<14} {r['density']:>7.3f} {r['tiles']:>8} {_cell(r.get(f'{mode}_ms'), '.3f', 9)} "
              f"{_cell(r.get(f'{mode}_speedup'), '.2f', 7)} {_cell(r.get(f'{mode}_ns_per_tile'), '.2f', 8)} "
              f"{_cell(r.get(f'{mode}_tflops'), '.1f', 7)} {_cell(r.get(f'{mode}_flex_ms'), '.3f', 9)} "
              f"{_cell(r.get(f'{mode}_flex_speedup'), '.2f', 7)} {_cell(r.get(f'{mode}_ft_over_flex'), '.2f', 7)}")


def print_long(rows: list[dict], modes) -> None:
    head = (f"{'seqlen':>7} {'density':>7} {'tiles':>9} {'mode':>8} {'ms':>10} {'peak GiB':>8} {'TFLOP/s':>7}"
            f" {'dense ms':>10} {'(est.)':>10} {'x dense':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for m in modes:
            print(f"{r['seqlen']:>7} {r['density']:>7.3f} {r['tiles']:>9} {m:>8} {_cell(r.get(f'{m}_ms'), '.2f', 10)} "
                  f"{_cell(r.get(f'{m}_peak_gib'), '.2f', 8)} {_cell(r.get(f'{m}_tflops'), '.1f', 7)} "
                  f"{_cell(r.get(f'{m}_dense_ms'), '.2f', 10)} {_cell(r.get(f'{m}_dense_estimate_ms'), '.1f', 10)} "
                  f"{_cell(r.get(f'{m}_speedup'), '.2f', 7)}")


def summary(rows: list[dict], long_rows: list[dict], args) -> list[str]:
    """One line per requirement."""
    lines = []
    mode = "fwd_bwd" if "fwd_bwd" in args.modes else args.modes[0]
    what = "fwd+bwd" if mode == "fwd_bwd" else "fwd"
    tag = f"{args.seqlen // 1024}k" if args.seqlen % 1024 == 0 else str(args.seqlen)
    for pct, target in ((10, 5.0), (50, 1.7)):
        match = [r for r in rows if r.get("requested_density") is not None
                 and abs(r["requested_density"] - pct / 100) < 1e-9]
        if not match:
            lines.append(f"{tag}, {pct}% tiles: not run (add {pct / 100} to --densities)")
            continue
        r = match[0]
        s = r.get(f"{mode}_speedup")
        flex = r.get(f"{mode}_flex_speedup")
        verdict = "" if s is None else (" ok" if s >= target else " BELOW TARGET")
        lines.append(f"{tag}, {pct}% tiles (density {r['density']:.3f}): {what} "
                     f"{_cell(s, '.2f')}x faster than dense (target {target:g}x){verdict}"
                     + (f"; flex {flex:.2f}x, flashtile/flex {r[f'{mode}_ft_over_flex']:.2f}" if flex else ""))
    for r in long_rows:
        ms, peak = r.get(f"{mode}_ms"), r.get(f"{mode}_peak_gib")
        ltag = f"{r['seqlen'] // 1024}k" if r["seqlen"] % 1024 == 0 else str(r["seqlen"])
        dense = r.get(f"{mode}_dense_ms")
        dense_s = (f"dense {_cell(dense, '.1f')} ms" if dense is not None
                   else f"dense ~{_cell(r.get(f'{mode}_dense_estimate_ms'), '.0f')} ms (estimated)")
        lines.append(f"{ltag}: sparse {what} {_cell(ms, '.2f')} ms at density {r['density']:.3f}, peak "
                     f"{_cell(peak, '.2f')} GiB; {dense_s}, {_cell(r.get(f'{mode}_speedup'), '.2f')}x")
    return lines


def plot(rows: list[dict], fits: dict, meta: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install flashtile[bench])")
        return
    rand = sorted((r for r in rows if r["pattern"].startswith("random")), key=lambda r: r["density"])
    dense = next((r for r in rows if r["pattern"] == "dense"), {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for mode, color in zip(meta["modes"], ("tab:blue", "tab:orange")):
        name = MODE_NAMES[mode]

        def series(key):
            pts = [(r["density"], r[key]) for r in rand if isinstance(r.get(key), float)]
            return list(zip(*pts)) if pts else None

        if s := series(f"{mode}_ms"):
            ax.plot(*s, "o-", color=color, label=f"flashtile block-sparse, {name}")
        if s := series(f"{mode}_flex_ms"):
            ax.plot(*s, "s--", color=color, alpha=0.7, label=f"FlexAttention, same mask, {name}")
        d = dense.get(f"{mode}_ms")
        if isinstance(d, float):
            ax.axhline(d, color=color, ls=":", label=f"flashtile dense, {name}")
            ax.plot([0, 1], [0, d], color=color, lw=0.6, alpha=0.5)  # dense time scaled by the density
        if s := series(f"{mode}_ns_per_tile"):
            ax2.plot(*s, "o-", color=color, label=f"flashtile block-sparse, {name}")
        if isinstance(dense.get(f"{mode}_ns_per_tile"), float):
            ax2.axhline(dense[f"{mode}_ns_per_tile"], color=color, ls=":", label=f"flashtile dense, {name}")
        fit = fits.get(mode)
        if fit:
            ax2.axhline(fit["ns_per_tile"], color=color, lw=0.6, alpha=0.5)
    ax.set_xlabel("fraction of tiles kept")
    ax.set_ylabel("ms")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, None)
    ax.set_title("time vs density (thin lines: dense time x density)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xlabel("fraction of tiles kept")
    ax2.set_ylabel("ns per non-empty tile")
    ax2.set_xlim(0, 1.02)
    ax2.set_ylim(0, None)
    ax2.set_title("time per tile (flat = linear in tiles; thin lines: fitted slope)", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"block-sparse attention, {meta['device']}: {meta['dtype']}, batch {meta['batch']}, seqlen "
                 f"{meta['seqlen']}, {meta['heads']} heads, d={meta['head_dim']}, blocks {meta['block_size']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------

def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=16384 if cuda else 512)
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,0.75,1.0" if cuda else "0.1,0.25,0.5,1.0",
                        help="requested fractions of tiles kept, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16 if cuda else 2)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 32)
    parser.add_argument("--block-size", type=int, default=128 if cuda else 64)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="fwd, fwd_bwd or both")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (always skipped on a CPU)")
    parser.add_argument("--patterns", action=argparse.BooleanOptionalAction, default=True,
                        help="also the causal, local+global and document rows (default: on)")
    parser.add_argument("--long", default="65536,131072" if cuda else "",
                        help="sequence lengths of the long sparse runs, comma-separated ('' for none)")
    parser.add_argument("--long-density", type=float, default=0.05, help="fraction of tiles kept in the long runs")
    parser.add_argument("--long-band", type=int, default=4, help="blocks kept either side of the diagonal there")
    parser.add_argument("--long-dense-max", type=int, default=65536,
                        help="time dense flashtile beside the long runs up to this length (estimate beyond)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random layouts")
    parser.add_argument("--out", default=None, help="write PATH.json and PATH.png")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes {', '.join(MODES)}, got {args.modes}")
    args.densities = [float(d) for d in args.densities.split(",") if d]
    if any(not 0 < d <= 1 for d in args.densities):
        parser.error("--densities must lie in (0, 1]")
    args.long = [int(n) for n in args.long.split(",") if n and int(n) > 0]
    args.flex = cuda and not args.no_flex
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (" + ("Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "tiled PyTorch path") \
            + "; smoke test sizes only)"
    start = time.perf_counter()
    print(f"block-sparse attention on {name}: {args.dtype}, batch {args.batch}, seqlen {args.seqlen}, "
          f"{args.heads} heads, head dim {args.head_dim}, blocks {args.block_size}, "
          f"flex {'on' if args.flex else 'off'}", flush=True)
    bench = Bench(args, device)
    bs = args.block_size
    n_blocks = -(-args.seqlen // bs)

    bench.add_dense(causal=False)
    for i, density in enumerate(args.densities):
        layout = random_layout(args.heads, n_blocks, density, seed=args.seed + i).to(device)
        mask = BlockMask.from_layout(layout, bs, args.seqlen, args.seqlen)
        bench.add_sparse(f"random {density:g}", mask, requested=density)
    if args.patterns:
        bench.add_dense(causal=True)
        bench.add_sparse("causal", BlockMask.causal(args.seqlen, args.seqlen, bs, device=device), flex_causal=True)
        for pname, mask in pattern_masks(args.seqlen, bs, device):
            bench.add_sparse(pname, mask)
    rows = bench.rows
    del bench
    if cuda:
        torch.cuda.empty_cache()
    dense_row = next(r for r in rows if r["pattern"] == "dense")
    long_rows = run_long(args, device, dense_row) if args.long else []

    fits = {m: linear_fit(rows, m) for m in args.modes}
    for mode in args.modes:
        print()
        print(f"{MODE_NAMES[mode]}, ms ({name}); x dense: dense flashtile over this; ft/flex: flashtile over flex")
        print_table(rows, mode)
        if fits[mode]:
            f = fits[mode]
            print(f"least squares over the random rows: ms = {f['intercept_ms']:.3f} + {f['ns_per_tile']:.3f} ns "
                  f"x tiles, r^2 = {f['r2']:.4f}")
    diffs = [r["flex_max_diff"] for r in rows if "flex_max_diff" in r]
    if diffs:
        print(f"flex vs flashtile outputs: max abs difference {max(diffs):.3g}")
    if long_rows:
        print()
        print("long sequences (sparse; dense timed or estimated from the dense row scaled by (seqlen/ref)^2)")
        print_long(long_rows, args.modes)
    print()
    lines = summary(rows, long_rows, args)
    for line in lines:
        print(line)
    print(f"({time.perf_counter() - start:.0f} s)")

    if args.out:
        meta = dict(device=name, torch=torch.__version__, flashtile=getattr(flashtile, "__version__", None),
                    dtype=args.dtype, batch=args.batch, seqlen=args.seqlen, heads=args.heads, head_dim=args.head_dim,
                    block_size=bs, modes=args.modes, flex=args.flex, seed=args.seed,
                    timing="triton.testing.do_bench median" if cuda else "median of 3 (perf_counter)")
        if cuda:
            try:
                import triton

                meta["triton"] = triton.__version__
            except ImportError:
                pass
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows, fits=fits, long=long_rows, summary=lines), f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
        plot(rows, fits, meta, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
