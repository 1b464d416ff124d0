#!/usr/bin/env bash
# The README's test command: install, then every test (the real-model tests included), Triton kernels
# checked in the interpreter so no GPU is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TRITON_INTERPRET=1
python3 -m pytest -p no:cacheprovider "$@"   # pyproject adds -q; the summary line (N passed) stays visible
