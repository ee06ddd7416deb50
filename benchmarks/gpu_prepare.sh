#!/usr/bin/env bash
# Run here (not on the GPU machine): gather what benchmarks/gpu_train.sh needs into .gpu/
# (ignored by git, carried to the GPU machine): the wheels absent from its image (MONAI, zarr,
# dask and what they need), and
# a compressed copy of the data splits.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two wheel folders, so that each run carries only what it needs (64 MiB travel in all):
# training needs MONAI alone; the whole-image benchmark needs zarr and dask.
get() {
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$@"
}
mkdir -p .gpu/whl_train .gpu/whl_bench
get .gpu/whl_train monai==1.6.1
get .gpu/whl_bench monai==1.6.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
    google-crc32c==1.9.0 dask==2026.8.0 toolz partd locket typing-extensions
.venv/bin/python benchmarks/pack_data.py "${1:-../shared/data/dsb2018}" .gpu/dsb2018
du -sh .gpu
