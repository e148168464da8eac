"""Print ratio tables from one or more bench.json files (flashtile / baseline, same run).

    python benchmarks/summarize.py bench_results/bench.json [--markdown]
"""

import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--baseline", default="sdpa_flash")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = defaultdict(dict)
    meta = None
    for f in args.files:
        data = json.load(open(f))
        meta = meta or data["meta"]
        for r in data["results"]:
            c = r["case"]
            key = (c["dtype"], c["head_dim"], c["causal"], r["mode"])
            rows[key].setdefault(c["seqlen"], {})[r["provider"]] = r
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}")
    seqlens = sorted({s for v in rows.values() for s in v})
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


if __name__ == "__main__":
    main()
