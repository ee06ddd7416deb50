#!/usr/bin/env bash
# The optional peer tools of benchmarks/peers.py, each in its own environment beside the
# repository (never in cellmask's): StarDist with TensorFlow on the CPU, and Cellpose 3.
# Then StarDist is trained from scratch on DSB2018 fluo_train for the same wall-clock budget
# as cellmask's shipped model (115 minutes on the development machine; pass another budget).
#   bash benchmarks/peers_setup.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-../peers-venv}
CELLPOSE=${CELLPOSE:-../cellpose-venv}
[ -x "$PEERS/bin/python" ] || python3 -m venv "$PEERS"
"$PEERS/bin/pip" install -q tensorflow-cpu==2.21.0 stardist==0.9.2 csbdeep==0.8.2
[ -x "$CELLPOSE/bin/python" ] || python3 -m venv "$CELLPOSE"
"$CELLPOSE/bin/pip" install -q torch==2.14.1 cellpose==3.1.1.3
mkdir -p runs/peers
OMP_WAIT_POLICY=PASSIVE "$PEERS/bin/python" benchmarks/peer_stardist.py train \
    --minutes "${1:-115}" --out runs/peers/stardist > runs/peers/stardist_train.log 2>&1
echo "now: python benchmarks/peers.py --stardist-python $PEERS/bin/python --cellpose-python $CELLPOSE/bin/python"
