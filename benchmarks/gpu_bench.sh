#!/usr/bin/env bash
# On a lent GPU machine: end-to-end segment_zarr throughput (8192^2 and 16384^2, Zarr in, NGFF
# labels out) and model-only throughput, fp32 and bf16, written to $OUT/gpu_bench.json.
#   prepare here:  bash benchmarks/gpu_prepare.sh     (wheels the GPU image lacks, into .gpu/)
#   run there:     bash benchmarks/gpu_bench.sh        (carry: .gpu/whl_bench)
#   dry run here:  DEVICE=cpu SIZES="1024" PRECISIONS=fp32 bash benchmarks/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import zarr, dask, monai" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl_bench/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
export PYTHONUNBUFFERED=1
"$PY" benchmarks/gpu_bench.py --device "${DEVICE:-cuda}" --sizes ${SIZES:-8192 16384} \
    --precisions ${PRECISIONS:-fp32 bf16} --batch "${BATCH:-8}" --out "$OUT" 2>&1 \
    | tee "$OUT/gpu_bench.log"
