#!/usr/bin/env bash
# Create .venv (if missing) and install cellmask into it, editable, with the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.cellmask-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
    constraints=()
    if [ "$(uname -m)" = "x86_64" ]; then constraints=(-c requirements/constraints.txt); fi
    .venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".[dev]" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -c "import cellmask, torch, torchvision" # fails loudly if the install did
    touch "$stamp"
fi
