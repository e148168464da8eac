"""Print ratio tables from one or more bench.json files (flashtile / baseline, same run).

    python benchmarks/tools/summarize.py bench_results/bench.json [--markdown]
    python benchmarks/tools/summarize.py bench_results/bench.json --by-provider   # README tables
    python benchmarks/tools/summarize.py bench_results/bench.json --graph   # GPU time alone (bench --graph)
"""

import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--baseline", default="sdpa_flash")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--graph", action="store_true",
                    help="TFLOP/s of CUDA-graph replays (a run with flashtile bench --graph) instead of eager calls")
    ap.add_argument("--by-provider", action="store_true",
                    help="markdown, one table per (dtype, head dim), a row per (provider, mode, causal)")
    args = ap.parse_args()
    rows = defaultdict(dict)
    meta = None
    for f in args.files:
        data = json.load(open(f))
        meta = meta or data["meta"]
        for r in data["results"]:
            c = r["case"]
            if args.graph:
                graphed = r.get("extra", {}).get("graph_tflops")
                r = dict(r, tflops=graphed, status=r["status"] if graphed else "no graph")
            key = (c["dtype"], c["head_dim"], c["causal"], r["mode"])
            rows[key].setdefault(c["seqlen"], {})[r["provider"]] = r
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}")
    seqlens = sorted({s for v in rows.values() for s in v})
    if args.by_provider:
        print_by_provider(rows, seqlens)
        return
    sep = " | " if args.markdown else "  "
    print(sep.join(["case", "mode"] + [f"{s}" for s in seqlens]))
    if args.markdown:
        print("|".join(["---"] * (len(seqlens) + 2)))
    for key in sorted(rows):
        dt, d, causal, mode = key
        cells = []
        for s in seqlens:
            p = rows[key].get(s, {})
            f, b = p.get("flashtile"), p.get(args.baseline)
            if f and b and f["status"] == "ok" and b["status"] == "ok":
                cells.append(f"{f['tflops']:.0f} ({f['tflops'] / b['tflops']:.2f}x)")
            else:
                cells.append("-")
        print(sep.join([f"{dt} d{d} {'causal' if causal else 'full'}", mode] + cells))


NAMES = {"flashtile": "flashtile", "sdpa_flash": "SDPA flash (FA2)", "sdpa_cudnn": "SDPA cuDNN", "flex": "FlexAttention",
         "sdpa_efficient": "SDPA efficient", "sdpa_math": "SDPA math"}


def print_by_provider(rows, seqlens):
    label = lambda s: f"{s // 1024}k" if s >= 1024 else str(s)  # noqa: E731
    for dt, d in sorted({(k[0], k[1]) for k in rows}):
        print(f"\n| {dt}, head dim {d} | " + " | ".join(label(s) for s in seqlens) + " |")
        print("|---" * (len(seqlens) + 1) + "|")
        for causal in (False, True):
            for mode in ("fwd", "fwd_bwd"):
                cells = rows.get((dt, d, causal, mode), {})
                providers = [p for p in NAMES if any(p in cells.get(s, {}) for s in seqlens)]
                for p in providers:
                    vals = []
                    for s in seqlens:
                        r = cells.get(s, {}).get(p)
                        vals.append(f"{r['tflops']:.0f}" if r and r["status"] == "ok" else "-")
                    name = f"{NAMES[p]}, {mode.replace('_', '+')}" + (", causal" if causal else "")
                    print(f"| {name} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
