#!/usr/bin/env bash
# Run here (not on the GPU machine): gather what benchmarks/gpu_train.sh needs into .gpu/
# (ignored by git, carried to the GPU machine): the MONAI wheel, absent from its image, and
# a compressed copy of the data splits.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl monai==1.6.1
.venv/bin/python benchmarks/pack_data.py "${1:-../shared/data/dsb2018}" .gpu/dsb2018
du -sh .gpu
