#!/usr/bin/env bash
# Run every benchmark one after the other (never two at once: they measure ratios on the same
# cores) and keep what each printed in bench/results/NAME.txt (JSON beside it where the
# benchmark writes one). Takes about an hour on 2 CPU cores. Usage: bench/run_all.sh [NAME...]
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
names=("${@:-cube cube_http segment windows embed cluster run naive store unet_variants region}")
for name in ${names[@]}; do
  echo "== $name ($(date -u +%H:%M:%S))"
  case $name in
    cube) cmd=(python bench/bench_cube.py --json bench/results/cube.json) ;;
    cube_http) cmd=(python bench/bench_cube.py --assets http --json bench/results/cube_http.json) ;;
    segment) cmd=(python bench/bench_segment.py --repeat 2 --json bench/results/segment.json) ;;
    embed) cmd=(python bench/bench_embed.py --repeat 11 --engines tensorflow,onnx,openvino:mixed_bfloat16) ;;
    cluster) cmd=(python bench/bench_cluster.py) ;;
    run) cmd=(python bench/bench_run.py --json bench/results/run.json) ;;
    naive) cmd=(python bench/bench_naive.py --rounds 3 ${NAIVE_MODELS:+--models "$NAIVE_MODELS"} --json bench/results/naive.json) ;;
    windows) cmd=(python bench/bench_windows.py --repeat 2 --json bench/results/windows.json) ;;
    store) cmd=(python bench/bench_store.py --rounds 2 --json bench/results/store.json) ;;
    unet_variants) cmd=(python bench/bench_unet_variants.py --out bench/results/unet_variants.json) ;;
    engines) cmd=(python bench/bench_engines.py --batches 1,4,16 ${ENGINES_MODELS:+--models "$ENGINES_MODELS"} --json bench/results/engines.json) ;;
    region) cmd=(python bench/bench_region.py ${REGION_RUN_PX:+--run --tile-px "$REGION_RUN_PX"} --json bench/results/region.json) ;;
    *) echo "unknown benchmark $name"; exit 2 ;;
  esac
  nice -n 5 "${cmd[@]}" 2>&1 | grep -av -e '^WARNING: All log' -e '^I0000' -e '^E0000' -e 'oneDNN' \
      -e 'cpu_feature_guard' -e 'To enable the following' -e 'UnstableSpecificationWarning' \
      -e 'v3_unstable_dtype_warning' > "bench/results/$name.txt"
  echo "   exit ${PIPESTATUS[0]}; tail:"; tail -n 6 "bench/results/$name.txt"
done
