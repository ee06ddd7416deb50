# Sourced by the GPU scripts: run from the repository root, set OUT and PY, make cellmask
# importable, and install the carried wheels of folder $1 when modules $2 are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import $2" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$1"/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
