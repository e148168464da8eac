#!/usr/bin/env bash
# One call on the lent GPU: GPU tests, launch-config sweep, the benchmark.
# Usage: bash benchmarks/gpu_check.sh [tests] [tune] [bench] [bench-quick]
set -u
export PYTHONUNBUFFERED=1 FLASHTILE_TEST_GPU=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in "$@"; do
  case $step in
    decode-tests) python3 -m pytest -q -m gpu -n 8 --tb=line tests/test_kvcache.py 2>&1 | tail -40 | tee "$OUT/decode_tests.log" ;;
    decode-bench) python3 benchmarks/decode.py --page-sizes 16,64,256 --out "$OUT/decode" 2>&1 | tee "$OUT/decode_bench.log" ;;
    decode-sweep) python3 benchmarks/decode.py --sweep --skip-table --sweep-lens 8192,16384,65536 \
                    --tiles 128x4x3,128x8x3,128x8x4,64x8x5 --splits 0,16,32 --out "$OUT/decode_sweep" 2>&1 \
                    | tee "$OUT/decode_sweep.log" ;;
    decode-sweep-paged) python3 benchmarks/decode.py --sweep-paged --skip-table --page-sizes 16,64 \
                    --sweep-lens 8192,16384,65536 --tiles 64x4x5,64x4x7,128x4x7,128x8x7 --splits 16,32 \
                    --out "$OUT/decode_sweep_paged" 2>&1 | tee "$OUT/decode_sweep_paged.log" ;;
    decode-sweep-programs)  # several programs a multiprocessor: smaller tiles, more splits
                    python3 benchmarks/decode.py --sweep --skip-table --sweep-lens 8192,16384 \
                    --tiles 128x4x3,64x4x3,64x4x4 --splits 16,32,40,48 --out "$OUT/decode_sweep_programs" 2>&1 \
                    | tee "$OUT/decode_sweep_programs.log"
                    python3 benchmarks/decode.py --sweep-paged --skip-table --page-sizes 16 --sweep-lens 8192,16384 \
                    --tiles 64x4x5,64x4x4,64x4x3 --splits 32,40,48 --out "$OUT/decode_sweep_programs_paged" 2>&1 \
                    | tee "$OUT/decode_sweep_programs_paged.log" ;;
    ab-page-ahead)  # paged decoding: bench_old/ (page ids loaded with the tile) against the working tree
      for side in old new; do
        [ $side = old ] && pp=$PWD/bench_old || pp=$PWD
        PYTHONPATH=$pp python3 benchmarks/decode.py --cache-lens 8192,16384,65536 --batch64-cache-len 4096 \
          --page-sizes 16,64 --out "$OUT/decode_page_ahead_$side" 2>&1 | tail -14 | sed "s/^/$side /"
      done
      python3 benchmarks/decode.py --sweep-paged --skip-table --page-sizes 16 --sweep-lens 8192,16384,65536 \
        --tiles 64x4x5,64x4x7,128x4x5,128x4x7 --splits 16,32 --out "$OUT/decode_page_ahead_sweep" 2>&1 \
        | tee "$OUT/decode_page_ahead_sweep.log" ;;
    decode-floor) python3 benchmarks/decode_floor.py --cache-lens 8192,16384 --out "$OUT/decode_floor" 2>&1 \
                    | tee "$OUT/decode_floor.log" ;;
    ab-page-ids)  # paged decoding: bench_old/ (a page id per row) against the working tree (per page)
      for side in old new; do
        [ $side = old ] && pp=$PWD/bench_old || pp=$PWD
        PYTHONPATH=$pp python3 benchmarks/decode.py --cache-lens 8192,16384,65536 --batch64-cache-len 4096 \
          --page-sizes 16,64 --out "$OUT/decode_page_ids_$side" 2>&1 | tail -14 | sed "s/^/$side /"
      done ;;
    sweep-page-ids) python3 benchmarks/decode.py --sweep-paged --skip-table --page-sizes 16 --sweep-lens 8192,16384 \
        --tiles 64x4x5,128x4x5,128x4x3,64x4x7 --splits 16,32 --out "$OUT/decode_page_ids_sweep" 2>&1 \
        | tee "$OUT/decode_page_ids_sweep.log" ;;
    sweep-paged-waves) python3 benchmarks/decode.py --sweep-paged --skip-table --page-sizes 16,64,256 \
        --sweep-lens 8192,16384,65536,131072 --tiles 64x4x5,64x4x7,128x4x5 --splits 16,32 \
        --out "$OUT/decode_paged_waves" 2>&1 | tee "$OUT/decode_paged_waves.log" ;;
    ab-combine)  # the combine kernel: bench_old/ against the working tree (its loads first), then its warps
      for side in old new; do
        [ $side = old ] && pp=$PWD/bench_old || pp=$PWD
        PYTHONPATH=$pp python3 benchmarks/decode.py --cache-lens 8192,16384,65536 --page-sizes 16 \
          --out "$OUT/decode_combine_$side" 2>&1 | tail -9 | sed "s/^/$side /"
      done
      python3 benchmarks/decode.py --skip-table --combine-warps 1,2,4,8 --sweep-lens 8192,16384,65536 --splits 0 \
        --page-sizes 16 --out "$OUT/decode_combine_warps" 2>&1 | tee "$OUT/decode_combine_warps.log" ;;
    ab-merge)  # the splits merged by the split kernel's last program or by the combine kernel, alternated
      python3 benchmarks/decode.py --skip-table --merge-ab --sweep-lens 8192,16384,32768,65536,131072 --splits 0 \
        --page-sizes 16,64,256 --out "$OUT/decode_merge_ab" 2>&1 | tee "$OUT/decode_merge_ab.log" ;;
    persistent-probe) python3 benchmarks/persistent_probe.py 2>&1 | tee "$OUT/persistent_probe.log" ;;
    fwd-gap-probe) python3 benchmarks/fwd_gap_probe.py 2>&1 | tee "$OUT/fwd_gap_probe.log" ;;
    table-vs-forced) python3 benchmarks/table_vs_forced.py 2>&1 | tee "$OUT/table_vs_forced.log" ;;
    cosine-tests) python3 -m pytest -q -m gpu -n 8 --tb=line tests/test_cosine_sim.py 2>&1 | tail -30 \
                    | tee "$OUT/cosine_tests.log" ;;
    cosine-bench) python3 benchmarks/cosine_sim.py --out "$OUT/cosine_sim.json" 2>&1 | tee "$OUT/cosine_bench.log" ;;
    cosine-bench-causal) python3 benchmarks/cosine_sim.py --causal --out "$OUT/cosine_sim_causal.json" 2>&1 \
                    | tee "$OUT/cosine_bench_causal.log" ;;
    cosine-train) python3 examples/train_cosine_sim.py --steps 300 --seqlen 8192 --batch 4 --val-every 100 \
                    --generate 256 --out "$OUT/train_cosine_sim" 2>&1 | tee "$OUT/cosine_train.log" ;;
    cosine-bench-fp32) python3 benchmarks/cosine_sim.py --dtypes float32 --seqlens 1024,2048,4096,8192 \
                    --out "$OUT/cosine_sim_fp32.json" 2>&1 | tee "$OUT/cosine_bench_fp32.log" ;;
    cosine-train-long) python3 examples/train_cosine_sim.py --steps 1500 --seqlen 8192 --batch 4 --val-every 250 \
                    --generate 256 --out "$OUT/train_cosine_sim" 2>&1 | tee "$OUT/cosine_train.log" ;;
    cosine-bench-causal-16) python3 benchmarks/cosine_sim.py --causal --dtypes float16,bfloat16 \
                    --out "$OUT/cosine_sim_causal.json" 2>&1 | tee "$OUT/cosine_bench_causal.log" ;;
    sparse-tests) python3 -m pytest -q -m gpu -n 8 --tb=line tests/test_block_sparse.py 2>&1 | tail -30 \
                    | tee "$OUT/sparse_tests.log" ;;
    sparse-bench) python3 benchmarks/sparse_density.py --long 65536,131072 --out "$OUT/block_sparse" 2>&1 \
                    | tee "$OUT/block_sparse.log" ;;
    tests) python3 -m pytest -q -m gpu -n 8 --tb=line tests/test_gpu.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.log" ;;
    tune-fp32) python3 benchmarks/tune.py --dtype fp32 --causal 0 --head-dims 64,128 2>&1 | tee "$OUT/tune_fp32.log" ;;
    tests-fp32) python3 -m pytest -q -m gpu -n 8 --tb=line tests/test_gpu.py tests/test_cosine_sim.py -k "float32 or fp32" \
                  2>&1 | tail -30 | tee "$OUT/fp32_tests.log" ;;
    tune-1k-small)  # 1k forward: tiles small enough for two programs a multiprocessor
      small=64x32x4x2,64x32x4x3,64x16x4x2,64x64x4x2,32x64x4x2,128x32x8x2,128x32x8x3,128x64x8x2,64x64x4x3
      python3 benchmarks/tune.py --kernels fwd --seqlen 1024 --causal 1 --head-dims 256,128,64 --configs $small 2>&1 \
        | tee "$OUT/tune_1k_small_causal.log"
      python3 benchmarks/tune.py --kernels fwd --seqlen 1024 --causal 0 --head-dims 256,64 --configs $small 2>&1 \
        | tee "$OUT/tune_1k_small_full.log" ;;
    tune-fwd256) python3 benchmarks/tune.py --kernels fwd --causal 0 --head-dims 256 2>&1 | tee "$OUT/tune_fwd256.log" ;;
    tune-bwd) python3 benchmarks/tune.py --kernels dkdv,dq --causal 0 --head-dims 64,128 2>&1 | tee "$OUT/tune_bwd.log" ;;
    features) python3 benchmarks/features.py --out "$OUT/features.json" 2>&1 | tee "$OUT/features.log" ;;
    ab-switches)  # plain kernels before (bench_old/, the previous commit) and after the option switches,
                  # alternated over rounds because run-to-run noise is several percent
      for round in 1 2 3; do for side in old new; do
        [ $side = old ] && pp=$PWD/bench_old || pp=$PWD
        PYTHONPATH=$pp python3 -m flashtile bench --dtypes bf16 --head-dims 64,128 --seqlens 4096,16384 \
          --modes fwd,fwd_bwd --providers flashtile --out "$OUT/ab_${side}_$round" > /dev/null 2>&1
      done; done ;;
    ab-plain)  # plain kernels of bench_old/ (before the option switches), bench_head/ (HEAD) and the
               # working tree, each with the same forced launch table, alternated over two rounds
      for round in 1 2; do for side in old head new; do
        [ $side = new ] && pp=$PWD || pp=$PWD/bench_$side
        PYTHONPATH=$pp python3 benchmarks/ab_plain.py --tag $side --out "$OUT/ab_${side}_$round.json" 2>&1 | grep TFLOP
      done; done ;;
    tests-causal)  # GPU tests of causal attention (forward, backward, varlen, block-sparse) and the decoding kernels
      python3 -m pytest -q -m gpu -n 14 --tb=line tests/test_gpu.py tests/test_kvcache.py -k "causal or kvcache or decode" \
        > "$OUT/causal_tests.log" 2>&1; tail -8 "$OUT/causal_tests.log" ;;
    ab-schedule) python3 benchmarks/ab_schedule.py --out "$OUT/ab_schedule.json" 2>&1 | tee "$OUT/ab_schedule.log" ;;
    tests-forward)  # every GPU test that runs the forward kernel (dense, block-sparse, cosine-sim); the
                    # failures again one at a time (14 test processes can run out of GPU memory together)
      python3 -m pytest -q -m gpu -n 12 --tb=line tests/test_gpu.py tests/test_block_sparse.py tests/test_cosine_sim.py \
        > "$OUT/forward_tests.log" 2>&1; tail -4 "$OUT/forward_tests.log"
      grep -q "failed" "$OUT/forward_tests.log" && python3 -m pytest -q -m gpu --lf --tb=short tests/test_gpu.py \
        tests/test_block_sparse.py tests/test_cosine_sim.py 2>&1 | tail -30 ;;
    bench-graph)  # the 1k-2k cells eager and as CUDA-graph replays (GPU time alone), flashtile and SDPA flash
      python3 -m flashtile bench --dtypes bf16 --modes fwd,fwd_bwd --providers flashtile,sdpa_flash --seqlens 1024,2048 \
        --graph --out "$OUT/graph" > "$OUT/bench_graph.log" 2>&1
      python3 benchmarks/summarize.py "$OUT/graph/bench.json"; python3 benchmarks/summarize.py --graph "$OUT/graph/bench.json" ;;
    bench-fwd-bf16) python3 -m flashtile bench --dtypes bf16 --modes fwd,fwd_bwd --providers flashtile,sdpa_flash,sdpa_cudnn \
                  --out "$OUT/main" > "$OUT/bench_main.log" 2>&1; tail -5 "$OUT/bench_main.log" ;;
    halves-tests) python3 -m pytest -q -m gpu -n 8 --tb=short tests/test_gpu.py -k two_halves 2>&1 | tail -15 \
                    | tee "$OUT/halves_tests.log" ;;
    halves-tune)  # the forward with two halves against the table's tiles
      for s in 1024 4096 16384; do
        python3 benchmarks/tune.py --kernels fwd --head-dims 128 --seqlen $s \
          --configs 128x128x8x3,256x64x8x3h,256x64x8x2h,128x64x4x3h,128x128x4x3h
      done 2>&1 | tee "$OUT/halves_tune_d128.log"
      for s in 1024 4096; do
        python3 benchmarks/tune.py --kernels fwd --head-dims 64 --seqlen $s \
          --configs 128x128x4x3,256x64x8x3h,128x128x4x3h,256x128x8x3h,128x64x4x3h
      done 2>&1 | tee "$OUT/halves_tune_d64.log" ;;
    tests-bwd-tma) FLASHTILE_BWD_TMA=1 python3 -m pytest -q -m gpu -n 8 tests/test_gpu.py \
                     -k "(flash_attn_gpu and (bfloat16 or float16)) or varlen or options or mask or dropout" 2>&1 | tail -4 ;;
    tune-bwd-tma) FLASHTILE_BWD_TMA=1 python3 benchmarks/tune.py --kernels dkdv,dq --causal 0 --head-dims 64,128 \
                    2>&1 | tee "$OUT/tune_bwd_tma.log" ;;
    ab-bwd-tma)
      for tma in 0 1; do
        FLASHTILE_BWD_TMA=$tma python3 -m flashtile bench --dtypes bf16 --seqlens 2048,4096,16384 --modes bwd \
          --providers flashtile --out "$OUT/bwd_tma_$tma" 2>&1 | grep -A3 "provider" | grep flashtile | tr -s ' ' \
          | sed "s/^/tma=$tma /"
      done ;;
    tma-probe) python3 benchmarks/tma_probe.py 2>&1 | tee "$OUT/tma_probe.log" ;;
    host) python3 benchmarks/host_overhead.py --profile 2>&1 | tee "$OUT/host.log" ;;
    ab-split)  # head dim 256: dK and dV in one launch (FLASHTILE_BWD_SPLIT=0) or two (=1), SDPA flash alongside
      for split in 0 1; do
        FLASHTILE_BWD_SPLIT=$split python3 -m flashtile bench --dtypes bf16 --head-dims 256 --seqlens 1024,2048,4096,16384 \
          --modes bwd,fwd_bwd --providers flashtile,sdpa_flash --out "$OUT/split_$split" > "$OUT/split_$split.log" 2>&1
        echo "split=$split"; python3 benchmarks/summarize.py --baseline sdpa_flash "$OUT/split_$split/bench.json" 2>&1 | tail -12
      done ;;
    ab-decode-plans)  # decoding steps as eager calls (host time included): bench_old/ (an earlier commit) and the working tree
      for side in old new; do
        [ $side = old ] && pp=$PWD/bench_old || pp=$PWD
        PYTHONPATH=$pp python3 benchmarks/decode.py --eager --cache-lens 8192,65536 --batch64-cache-len 4096 --page-sizes 16 \
          --out "$OUT/decode_eager_$side" 2>&1 | tail -6 | sed "s/^/$side /"
      done ;;
    tune-split)  # the two launches' tiles at head dim 256 (the whole backward timed)
      python3 benchmarks/tune.py --kernels dv --head-dims 256 \
        --configs 64x128x8x2,32x128x8x2,32x128x8x3,16x128x8x3,16x128x8x4 2>&1 | tee -a "$OUT/tune_split.log"
      python3 benchmarks/tune.py --kernels dk --head-dims 256 \
        --configs 32x128x8x2,32x128x8x3,16x128x8x3,16x128x8x4 2>&1 | tee -a "$OUT/tune_split.log" ;;
    autotune) python3 -m pytest -q -m gpu tests/test_autotune.py 2>&1 | tail -3
              python3 benchmarks/autotune_gain.py 2>&1 | tee "$OUT/autotune.log" ;;
    tests-cpu-suite) python3 -m pytest -q -n 8 -x tests -k "not compile" 2>&1 | tail -5 ;;
    tune) python3 benchmarks/tune.py --causal 0 2>&1 | tee "$OUT/tune.log" ;;
    tune-fwd-variants)
      for v in "0 0" "1 0" "0 1" "1 1"; do set -- $v
        echo "### forward variant: TMA=$1 warp_specialize=$2"
        FLASHTILE_FWD_TMA=$1 FLASHTILE_FWD_WS=$2 python3 benchmarks/tune.py --kernels fwd --causal 0 \
          --head-dims 64,128 2>&1 | grep -A3 "^=="
      done | tee "$OUT/tune_fwd_variants.log" ;;
    tests-variants)
      FLASHTILE_FWD_TMA=1 FLASHTILE_FWD_WS=1 python3 -m pytest -q -m gpu -n 8 tests/test_gpu.py \
        -k "bfloat16 or float16" 2>&1 | tail -4 ;;
    bench) python3 -m flashtile bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
    bench-main) python3 -m flashtile bench --providers flashtile,sdpa_flash,sdpa_cudnn,sdpa_efficient \
                  --out "$OUT/main" 2>&1 | tee "$OUT/bench_main.log" ;;
    bench-main-bf16) python3 -m flashtile bench --dtypes bf16 --providers flashtile,sdpa_flash,sdpa_cudnn \
                  --out "$OUT/main" 2>&1 | tail -60 > "$OUT/bench_main.log" ;;
    bench-flex) python3 -m flashtile bench --dtypes bf16 --head-dims 64,128 --seqlens 2048,8192,16384 \
                  --providers flashtile,flex,sdpa_math --out "$OUT/flex" 2>&1 | tee "$OUT/bench_flex.log" ;;
    bench-quick) python3 -m flashtile bench --dtypes bf16 --head-dims 64,128 --seqlens 2048,8192,16384 \
                   --providers flashtile,sdpa_flash,sdpa_cudnn --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
  esac
done
