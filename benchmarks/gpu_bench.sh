#!/usr/bin/env bash
# On a lent GPU machine: end-to-end segment_zarr throughput (8192^2 and 16384^2, Zarr in, NGFF
# labels out) and model-only throughput, fp32 and bf16, written to $OUT/gpu_bench.json.
#   prepare here:  bash benchmarks/gpu_prepare.sh     (wheels the GPU image lacks, into .gpu/)
#   run there:     bash benchmarks/gpu_bench.sh        (carry: .gpu/whl_bench)
#   dry run here:  DEVICE=cpu SIZES="1024" PRECISIONS=fp32 bash benchmarks/gpu_bench.sh
source "$(dirname "$0")/gpu_env.sh" .gpu/whl_bench "zarr, dask, monai"
"$PY" benchmarks/gpu_bench.py --device "${DEVICE:-cuda}" --sizes ${SIZES:-8192 16384} \
    --precisions ${PRECISIONS:-fp32 mixed bf16} --batch "${BATCH:-8}" --tile "${TILE:-1024}" --out "$OUT" \
    ${DATA:+--data "$DATA" --split "${SPLIT:-train.txt}"} 2>&1 \
    | tee "$OUT/gpu_bench.log"
