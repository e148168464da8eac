#!/usr/bin/env bash
# The kernels of an earlier commit against this checkout's, in one run on one GPU: the same
# benchmark cells timed with each (flashtile bench, then the sliding-window cases of
# benchmarks/features.py), and each cell's time ratio (this checkout / the earlier commit).
#   bash benchmarks/tools/compare_commits.sh 0eb64b1            (results under $OUT, default /tmp/out)
# The earlier commit's package is taken with git archive, so its flashtile must run with this
# checkout's benchmark scripts (any commit since the package layout of flashtile/).
set -u
ref=${1:?usage: compare_commits.sh GIT_REF}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
base=$(mktemp -d)
git archive "$ref" flashtile | tar -x -C "$base"
ARGS=(--dtypes bf16 --head-dims 64,128 --seqlens 1024,4096,16384 --modes fwd,fwd_bwd --providers flashtile)
for tree in base head; do
  if [ $tree = base ]; then path=$base; else path=$PWD; fi
  PYTHONPATH=$path timeout 240 python3 -m flashtile bench "${ARGS[@]}" --out "$OUT/compare_$tree" \
    > "$OUT/compare_$tree.log" 2>&1 || echo "$tree: bench exited $?"
  PYTHONPATH=$path timeout 100 python3 benchmarks/features.py --parts window --out "$OUT/compare_window_$tree.json" \
    > "$OUT/compare_window_$tree.log" 2>&1 || echo "$tree: window cases exited $?"
done
OUT=$OUT python3 - <<'PY'
import json, os

out = os.environ["OUT"]

def cells(tree):
    rows = json.load(open(f"{out}/compare_{tree}/bench.json"))["results"]
    return {(r["case"]["head_dim"], r["case"]["seqlen"], r["case"]["causal"], r["mode"]): r["ms"]
            for r in rows if r.get("ms")}

def window(tree):
    rows = json.load(open(f"{out}/compare_window_{tree}.json"))["window"]["rows"]
    return {(row["mode"], name): ms for row in rows for name, ms in row.items() if name != "mode"}

for load in (cells, window):
    base, head = load("base"), load("head")
    for key in sorted(base, key=str):
        if key in head:
            print(key, f"{base[key]:.3f} ms -> {head[key]:.3f} ms, ratio {head[key] / base[key]:.3f}")
PY
