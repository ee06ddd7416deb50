#!/usr/bin/env bash
# On a lent GPU machine: fine-tune the shipped model for at most MINUTES, tune its thresholds
# on val, and evaluate old and new weights on val (the test splits stay for the CPU here:
# the data that travels is limited). Writes to $OUT:
# nuclei_gpu.safetensors, train.log, results.txt, gpu.txt.
#   prepare here:   bash benchmarks/gpu_prepare.sh
#   run there:      bash benchmarks/gpu_train.sh          (carry: .gpu/whl_train and .gpu/dsb2018)
#   try on a CPU:   DEVICE=cpu ITERS=4 MINUTES=1 BATCH=2 WORKERS=0 SPLIT_EVAL=val bash benchmarks/gpu_train.sh
source "$(dirname "$0")/gpu_env.sh" .gpu/whl_train "monai"
DATA=${DATA:-.gpu/dsb2018}
DEVICE=${DEVICE:-cuda}
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no GPU: $DEVICE") \
    | tee "$OUT/gpu.txt"
"$PY" -m cellmask --quiet train --data "$DATA" --split splits/train.txt --out "$OUT/run" \
    --init cellmask/weights/nuclei.safetensors --iterations "${ITERS:-4000}" \
    --batch-size "${BATCH:-16}" --lr "${LR:-1e-3}" --warmup 200 --max-minutes "${MINUTES:-8}" \
    --device "$DEVICE" --workers "${WORKERS:-12}" --checkpoint-minutes 2 2>&1 | tee "$OUT/train.log"
tail -n 3 "$OUT/run/log.csv" | tee -a "$OUT/train.log"
"$PY" -m cellmask --quiet export "$OUT/run/weights.safetensors" --data "$DATA" \
    --split splits/val.txt --out "$OUT/nuclei_gpu.safetensors" 2>&1 | tee -a "$OUT/train.log"
for split in ${SPLIT_EVAL:-val fluo_val}; do
    for weights in cellmask/weights/nuclei.safetensors "$OUT/nuclei_gpu.safetensors"; do
        echo "== $weights on $split ($(cat "$OUT/gpu.txt"))"
        "$PY" -m cellmask --quiet evaluate --data "$DATA" --split "splits/$split.txt" \
            --model "$weights" --device "$DEVICE" | tail -n 1
    done
done 2>&1 | tee "$OUT/results.txt"
rm -rf "$OUT/run"
