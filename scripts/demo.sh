#!/usr/bin/env bash
# Set up (first run only) and run the demo: segment the shipped sample with the shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/cellmask demo "$@"
