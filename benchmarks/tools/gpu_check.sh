#!/usr/bin/env bash
# Everything a GPU run checks and measures, in one call on a GPU machine: the GPU
# tests, then the benchmarks, results under $OUT (default /tmp/out).
#   bash benchmarks/tools/gpu_check.sh tests bench decode sparse
set -u
export PYTHONUNBUFFERED=1 FLASHTILE_TEST_GPU=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in "$@"; do
  case $step in
    tests)  # every GPU test (the CPU tests of the same features run too where they take a GPU tensor)
      python3 -m pytest -q -m gpu -n 8 --tb=line tests > "$OUT/gpu_tests.log" 2>&1; tail -30 "$OUT/gpu_tests.log" ;;
    bench)  # the standard grid against SDPA's flash and cuDNN backends
      python3 -m flashtile bench --providers flashtile,sdpa_flash,sdpa_cudnn --out "$OUT/main" > "$OUT/bench_main.log" 2>&1
      python3 benchmarks/tools/summarize.py --baseline sdpa_flash "$OUT/main/bench.json" ;;
    bench-graph)  # short cells eager and as CUDA-graph replays (the GPU's time without the host's)
      python3 -m flashtile bench --dtypes bf16 --modes fwd,fwd_bwd --providers flashtile,sdpa_flash --seqlens 1024,2048 \
        --graph --out "$OUT/graph" > "$OUT/bench_graph.log" 2>&1
      python3 benchmarks/tools/summarize.py --graph "$OUT/graph/bench.json" ;;
    flex) python3 -m flashtile bench --dtypes bf16 --seqlens 1024,4096,16384 --providers flashtile,flex \
            --out "$OUT/flex" > "$OUT/bench_flex.log" 2>&1
          python3 benchmarks/tools/summarize.py --baseline flex "$OUT/flex/bench.json" ;;
    features) python3 benchmarks/features.py --out "$OUT/features.json" 2>&1 | tee "$OUT/features.log" ;;
    paged)  # paged prefill against contiguous keys: pointer loads (the default), then descriptors over the pages
      python3 benchmarks/features.py --parts paged --out "$OUT/paged.json" 2>&1 | tee "$OUT/paged.log"
      FLASHTILE_FWD_TMA=1 python3 benchmarks/features.py --parts paged --out "$OUT/paged_tma.json" 2>&1 \
        | tee "$OUT/paged_tma.log" ;;
    decode) python3 benchmarks/decode.py --page-sizes 16,64,256 --out "$OUT/decode" 2>&1 | tee "$OUT/decode.log" ;;
    sparse) python3 benchmarks/sparse_density.py --long 65536,131072 --out "$OUT/block_sparse" 2>&1 \
              | tee "$OUT/block_sparse.log" ;;
    cosine) python3 benchmarks/cosine_sim.py --out "$OUT/cosine_sim.json" 2>&1 | tee "$OUT/cosine_sim.log"
            python3 benchmarks/cosine_sim.py --causal --out "$OUT/cosine_sim_causal.json" 2>&1 \
              | tee "$OUT/cosine_sim_causal.log" ;;
    cosine-train) python3 examples/train_cosine_sim.py --steps 300 --seqlen 8192 --batch 4 --val-every 100 \
                    --generate 256 --out "$OUT/train_cosine_sim" 2>&1 | tee "$OUT/cosine_train.log" ;;
    host) python3 benchmarks/host_overhead.py --grid 2>&1 | tee "$OUT/host.log" ;;
    fp8) python3 benchmarks/tools/fp8_sweep.py --out "$OUT/fp8_sweep.json" 2>&1 | tee "$OUT/fp8_sweep.log"
         python3 benchmarks/fp8.py --speed --out "$OUT/fp8.json" 2>&1 | tee "$OUT/fp8.log"
         python3 benchmarks/decode.py --kv-fp8 --skip-table --out "$OUT/decode_fp8" 2>&1 | tee "$OUT/decode_fp8.log" ;;
    gluon)  # the Gluon kernels' GPU tests (NaN-safe causal tiles and the dK/dV kernel included), then their timing:
            # the forward at head dims 128 and 64, the backward with the dK/dV kernel against the Triton one
      python3 -m pytest -q -m gpu -n 8 --tb=line tests/backends/triton/test_gluon_dispatch.py 2>&1 | tail -5
      python3 benchmarks/tools/gluon_bench.py --head-dim 128 --seqlens 1024,2048,4096,8192,16384 --causal 0,1 \
        2>&1 | tee "$OUT/gluon.log"
      python3 benchmarks/tools/gluon_bench.py --head-dim 64 --seqlens 1024,4096,16384 --causal 0,1 \
        2>&1 | tee "$OUT/gluon64.log"
      python3 benchmarks/tools/gluon_bench.py --backward --head-dim 64,128 --seqlens 1024,4096,16384 \
        2>&1 | tee "$OUT/gluon_bwd.log"
      python3 benchmarks/tools/gluon_bench.py --backward --head-dim 128 --seqlens 4096,16384 --heads 16,4 \
        2>&1 | tee "$OUT/gluon_bwd_gqa.log" ;;
    ring) python3 benchmarks/ring_step.py --out "$OUT/ring_step.json" 2>&1 | tee "$OUT/ring_step.log" ;;
    cp-scaling)  # several GPUs: the NCCL tests, then ring and Ulysses scaling against one GPU
      python3 -m pytest -q -m gpu --tb=line tests/distributed > "$OUT/cp_tests.log" 2>&1; tail -5 "$OUT/cp_tests.log"
      python3 benchmarks/ring_scaling.py --out "$OUT/ring_scaling.json" 2>&1 | tee "$OUT/ring_scaling.log"
      python3 benchmarks/ring_scaling.py --method ulysses --out "$OUT/ulysses_scaling.json" 2>&1 \
        | tee "$OUT/ulysses_scaling.log" ;;
    train) python3 benchmarks/train.py --out "$OUT/train.json" 2>&1 | tee "$OUT/train.log" ;;
    fuzz)  # the three GPU fuzz tests side by side, each reporting its first failure as drawn (no shrinking),
           # each stopped after FUZZ_TIMEOUT seconds (a killed pytest reports nothing: its log says how far it got)
      for t in test_fuzz_gpu test_fuzz_fp8_gpu test_fuzz_kvcache_gpu; do
        (FLASHTILE_FUZZ_SHRINK=0 FLASHTILE_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-1000} timeout "${FUZZ_TIMEOUT:-450}" \
           python3 -m pytest -q -s -m gpu -p no:xdist --tb=short --hypothesis-verbosity=verbose \
           "tests/fuzz/test_fuzz.py::$t" > "$OUT/$t.log" 2>&1; echo "$t rc=$?" >> "$OUT/$t.log") &
      done
      wait
      for t in test_fuzz_gpu test_fuzz_fp8_gpu test_fuzz_kvcache_gpu; do
        echo "== $t: $(grep -c 'Trying example' "$OUT/$t.log") cases tried"
        grep -v 'Trying example' "$OUT/$t.log" | grep -E 'passed|failed|Error|assert|Falsifying|rc=' | tail -8
      done ;;
    models) python3 benchmarks/models.py --out "$OUT/models.json" 2>&1 | tee "$OUT/models.log" ;;
    tune) python3 benchmarks/tools/tune.py 2>&1 | tee "$OUT/tune.log" ;;
    *) echo "unknown step: $step (tests bench bench-graph flex features paged decode sparse cosine cosine-train host models tune fp8 gluon ring cp-scaling train fuzz)"
       exit 2 ;;
  esac
done
